"""A fit resumed from a checkpoint written at the end of an epoch's last batch (``ModelCheckpoint(every_n_train_steps=
1)``): Lightning goes on with the next epoch and never runs the finished epoch's ``on_train_epoch_end``, where a
``restore_best`` stage that ends there loads its best weights. The resumed run must end as the uninterrupted one."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageScheduleCallback

DATA = TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)),
                     torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1)))


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.loss_weights = {"cls": 1.0}
        self.starts: dict[int, torch.Tensor] = {}  # global step -> the weights the step starts from
        self.validated: dict[int, torch.Tensor] = {}  # global step -> the weights validated there

    def training_step(self, batch, batch_idx):
        self.starts[self.trainer.global_step] = self.net.weight.detach().clone()
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.validated[self.trainer.global_step] = self.net.weight.detach().clone()
        self.log("val/m", float(self.trainer.global_step))  # mode min: the first validation is the stage's best

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(DATA, batch_size=4)  # 4 batches an epoch

    def val_dataloader(self):
        return DataLoader(DATA, batch_size=16)


def _fit(root, stages, ckpt_path=None, checkpoint=False):
    model = Net()
    callbacks = [StageScheduleCallback(stage_schedule=stages, verbose=False)]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=root / "ck", every_n_train_steps=1, save_top_k=-1, filename="{step}"))
    pl.Trainer(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, max_epochs=5, check_val_every_n_epoch=2,
               callbacks=callbacks).fit(model, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(("stages", "step"), [
    # the stage ends with epoch 2 (global step 12), the last batch's checkpoint; ft starts from kd's best weights
    ([{"name": "kd", "start_epoch": 0, "end_epoch": 3, "monitor": "val/m", "restore_best": True},
      {"name": "ft", "start_epoch": 3}], 12),
    # the stage runs to the end of the run: the run's last batch's checkpoint
    ([{"name": "kd", "start_epoch": 0, "monitor": "val/m", "restore_best": True}], 20),
])
def test_a_resume_past_a_restore_best_stages_last_batch_restores_its_best_weights(tmp_path, stages, step):
    whole = _fit(tmp_path / "whole", stages, checkpoint=True)
    best = whole.validated[8]  # validations run at steps 8 and 16 only; the first is the best
    assert torch.equal(whole.net.weight if step == 20 else whole.starts[12], best)
    resumed = _fit(tmp_path / "resumed", stages, ckpt_path=tmp_path / "whole" / "ck" / f"step={step}.ckpt")
    if step == 12:
        assert torch.equal(resumed.starts[12], best)
    assert torch.equal(resumed.net.weight, whole.net.weight)
