"""``Trainer(fast_dev_run=True)``, Lightning's smoke test, with a multi-stage schedule: its one epoch (one batch) is no
run length to check the schedule against, so the first stage runs instead of every later stage being refused."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import DistillationModule, StageScheduleCallback


class Student(DistillationModule, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net, self.loss_weights, self.seen = nn.Linear(4, 4), {"ce": 1.0}, []

    def configure_teachers(self):
        return {"teacher": nn.Linear(4, 4)}

    def training_step(self, batch, batch_idx):
        out = self.net(batch[0])
        self.seen.append((self.stage_name, self.use_distillation))
        distill = {"kd": ((out - self.run_teachers(batch[0])["teacher"]) ** 2).mean()} if self.use_distillation else {}
        return self.weighted_loss({"ce": out.pow(2).mean()}, distill)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("stages", [
    [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True, "ramp_epochs": 1},
     {"name": "ft", "start_epoch": 2, "distillation": False}],
    [{"name": "kd", "start_step": 0, "end_step": 5, "distillation": True},
     {"name": "ft", "start_step": 5, "monitor": "val_loss", "patience": 1, "restore_best": True}],
], ids=["epochs", "steps"])
def test_fast_dev_run_runs_the_first_stage_of_a_multi_stage_schedule(tmp_path, stages):
    model = Student()
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = pl.Trainer(fast_dev_run=True, max_epochs=4, default_root_dir=tmp_path, enable_progress_bar=False,
                         callbacks=[StageScheduleCallback(stage_schedule=stages, verbose=False)])
    trainer.fit(model, loader, loader)  # before: "starts at or beyond max_epochs (1)" for the epoch schedule
    assert model.seen == [("kd", True)]
