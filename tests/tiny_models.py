"""Tiny models shared by the Trainer-level tests: a student with a teacher, and its plain twin."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import DistillationModule
from lightning_stages.losses import FeatureAdapter, feature_mse, logit_kd

FIVE_WEIGHTS = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}


def loader(n: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class CountingTeacher(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU())
        self.head = nn.Linear(width, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.body(x))


def task_losses(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    p = torch.sigmoid(logits[:, 1])
    t = y.float()
    bce = F.binary_cross_entropy_with_logits(logits[:, 1], t)
    return {
        "bce": bce,
        "focal": ((1 - torch.exp(-bce)) ** 2 * bce),
        "dice": 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1),
        "iou": (p - t).abs().mean(),
        "cls": F.cross_entropy(logits, y),
    }


class PlainStudent(pl.LightningModule):
    """A student written without the plugin: fixed weights, no teacher."""

    def __init__(self, loss_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)
        self.loss_weights = dict(loss_weights or FIVE_WEIGHTS)
        self.losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = task_losses(self(x), y)
        loss = sum(self.loss_weights[k] * v for k, v in losses.items())
        self.log("train/loss", loss)
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Student(DistillationModule, PlainStudent):
    """The same student with the plugin: a teacher, feature hooks, an adapter used only while distilling."""

    def __init__(self, loss_weights: dict[str, float] | None = None, hooks: dict | None = None) -> None:
        super().__init__(loss_weights)
        self.adapter = FeatureAdapter(4, 16)
        self.teacher_builds = 0
        self.hooks = {"student": ["body"], "teacher": ["body"]} if hooks is None else hooks
        self.seen: list[tuple[int, str, bool, float, dict]] = []  # (epoch, stage, distill, lambda, weights) per step
        self.teacher_calls_per_epoch: dict[int, int] = {}

    def configure_teachers(self):
        self.teacher_builds += 1
        with torch.random.fork_rng():
            torch.manual_seed(123)
            return {"teacher": CountingTeacher()}

    def configure_feature_hooks(self):
        return self.hooks

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        outputs = self.run_teachers(x)
        distill = {}
        if outputs:
            distill["logit_kd"] = logit_kd(logits, outputs["teacher"], temperature=2.0)
            if self.hooks:
                distill["feature"] = feature_mse(
                    self.captured_features()["body"], self.captured_features("teacher")["body"], self.adapter
                )
        losses = task_losses(logits, y)
        loss = self.weighted_loss(losses, distill)
        self.log("train/loss", loss)
        self.losses.append(loss.detach().clone())
        self.seen.append(
            (self.trainer.current_epoch, self.stage_name, self.use_distillation, self.lambda_coef, dict(self.loss_weights))
        )
        teacher = self.teachers.get("teacher")
        self.teacher_calls_per_epoch[self.trainer.current_epoch] = teacher.calls if teacher is not None else 0
        return loss


def trainer(tmp_path, max_epochs: int = 4, callbacks=(), **kwargs) -> pl.Trainer:
    defaults = {
        "default_root_dir": tmp_path,
        "max_epochs": max_epochs,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)
