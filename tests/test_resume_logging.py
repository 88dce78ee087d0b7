"""What a resumed run logs: the `stage/*` scalars at the step it resumes at hold the values its module trains with
there (a ramp's value at that batch), and an epoch that Lightning resumes into without `on_train_epoch_start` (a
checkpoint of the previous epoch's last batch) still gets its scalars. References: the README's ramp formula."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import Capture
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageScheduleCallback
from lightning_stages.schedule.render import format_stage_line
from lightning_stages.schedule.stage import ResolvedStage

DATA = TensorDataset(torch.randn(24, 4, generator=torch.Generator().manual_seed(0)),
                     torch.randint(0, 2, (24,), generator=torch.Generator().manual_seed(1)))  # 6 batches of 4


class _Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.loss_weights = nn.Linear(4, 2), {"cls": 1.0}

    def training_step(self, batch, batch_idx):
        return self.loss_weights["cls"] * F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(root, stages, every, ckpt_path=None):
    logger = Capture()
    callbacks = [StageScheduleCallback(stage_schedule=stages, verbose=False)]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=root / "ck", every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    pl.Trainer(default_root_dir=root, max_epochs=4, logger=logger, callbacks=callbacks, enable_progress_bar=False,
               enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0).fit(
        _Net(), DataLoader(DATA, batch_size=4), ckpt_path=ckpt_path)
    return {(step, key): value for step, metrics in logger.calls for key, value in metrics.items()
            if key.startswith("stage/")}


@pytest.mark.parametrize("step", [8, 15])
def test_a_mid_epoch_resume_inside_an_epoch_ramp_logs_the_ramps_value_at_that_batch(tmp_path, step):
    stages = [{"name": "warm", "start_epoch": 0, "end_epoch": 1, "loss_weights": {"cls": 0.0}},
              {"name": "main", "start_epoch": 1, "ramp_epochs": 1.5, "loss_weights": {"cls": 1.0}}]
    _fit(tmp_path, stages, every=1)
    logged = _fit(tmp_path / "resumed", stages, every=1, ckpt_path=tmp_path / "ck" / f"step={step}.ckpt")
    epoch, batch = divmod(step, 6)
    expected = min(max((epoch + batch / 6 - 1) / 1.5, 0.0), 1.0)  # README: progress over ramp_epochs, linear
    assert logged[(step, "stage/weight_cls")] == pytest.approx(expected)


def test_an_epoch_resumed_past_the_previous_epochs_last_batch_gets_its_scalars(tmp_path):
    stages = [{"name": "warm", "start_epoch": 0, "end_epoch": 2, "loss_weights": {"cls": 0.5}},
              {"name": "main", "start_epoch": 2, "loss_weights": {"cls": 1.0}}]
    whole = _fit(tmp_path, stages, every=6)  # checkpoints at each epoch's last batch: steps 6, 12, ...
    resumed = _fit(tmp_path / "resumed", stages, every=6, ckpt_path=tmp_path / "ck" / "step=12.ckpt")
    assert resumed[(12, "stage/number")] == 2.0 and resumed[(12, "stage/weight_cls")] == 1.0
    assert {k: v for k, v in whole.items() if k[0] >= 12} == {k: v for k, v in resumed.items() if k[0] >= 12}


def test_a_loss_name_cannot_add_a_line_to_the_stage_line():
    line = format_stage_line(0, ResolvedStage("a", 0, 1, 1, 0, None, False, 1.0, {"cls\nepoch 7": 1.0}))
    assert "\n" not in line and "cls\\nepoch 7=1.0" in line
