"""A ramp out of distillation keeps the teachers running until it ends (the coefficient reaches 0 there): the
schedule says so in `distilling_until`, and a run resumed inside such a ramp builds its teachers at fit start."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import DistillationModule, StageSchedule, StageScheduleCallback

KD = {"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True}


@pytest.mark.parametrize(("stages", "total", "until"), [
    ([KD, {"name": "ft", "start_epoch": 2, "end_epoch": 4, "ramp_epochs": 2}], {"total_epochs": 4}, 4.0),
    ([KD, {"name": "ft", "start_epoch": 2, "ramp_epochs": 1.5}], {"total_epochs": 9}, 4.0),  # into epoch 3
    ([KD, {"name": "ft", "start_epoch": 2, "ramp_steps": 5}], {"total_epochs": 9}, 9.0),  # bounded by the stage
    ([{"name": "kd", "start_step": 0, "end_step": 900, "distillation": True},
      {"name": "ft", "start_step": 900, "ramp_steps": 300}], {"total_steps": 3000}, 1200.0),
    # a ramp from settings that do not distill, and no ramp: nothing more
    ([{"name": "a", "start_epoch": 0, "end_epoch": 2}, {"name": "b", "start_epoch": 2, "ramp_epochs": 2}],
     {"total_epochs": 6}, 0.0),
    ([KD, {"name": "ft", "start_epoch": 2}], {"total_epochs": 4}, 2.0),
])
def test_distilling_until_counts_a_ramp_out_of_distillation(stages, total, until):
    schedule = StageSchedule(stages, **total)
    assert schedule.distilling_until() == until
    if schedule.unit == "epoch" and until > 2 and until < 9:  # every epoch before it distills, at its first batch
        assert all(schedule.at(epoch).distillation for epoch in range(int(until)))
        assert not schedule.at(int(until)).distillation


class _Student(DistillationModule, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        self.loss_weights = {"cls": 1.0}
        self.built_in_step: list[bool] = []
        self._in_step = False

    def configure_teachers(self):
        self.built_in_step.append(self._in_step)
        torch.manual_seed(5)
        return {"teacher": nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))}

    def configure_feature_hooks(self):
        return {"student": ["net.0"], "teacher": ["0"]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def training_step(self, batch, batch_idx):
        self._in_step = True
        x, y = batch
        logits = self.net(x)
        distill = {}
        if out := self.run_teachers(x):
            distill["kd"] = F.mse_loss(logits, out["teacher"])
            distill.update(self.feature_losses())
        self._in_step = False
        return self.weighted_loss({"cls": F.cross_entropy(logits, y)}, distill)


def test_a_run_resumed_inside_a_ramp_out_of_distillation_builds_its_teachers_at_fit_start(tmp_path):
    stages = [KD, {"name": "ft", "start_epoch": 2, "end_epoch": 4, "ramp_epochs": 2}]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))

    def fit(model, max_epochs, ckpt_path=None, callbacks=()):
        pl.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[StageScheduleCallback(stages, verbose=False), *callbacks]
                   ).fit(model, DataLoader(data, batch_size=4), ckpt_path=ckpt_path)

    class StopBeforeFt(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    fit(_Student(), 4, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True), StopBeforeFt()])
    resumed = _Student()
    fit(resumed, 4, ckpt_path=tmp_path / "ck" / "last.ckpt")  # the first resumed step distills (the ramp)
    assert resumed.built_in_step == [False]
