"""Trains a tiny student under a 2-process CPU strategy (gloo) and writes what each rank saw to JSON.

Run by ``tests/test_ddp.py`` in a subprocess, so that the pytest process never initialises a process group:

    python tests/_ddp_worker.py --strategy ddp --out DIR [--accumulate 2]

The schedule is finetune -> distill -> finetune, one epoch each, so the run crosses a finetune -> distill and a
distill -> finetune boundary. ``adapter`` is an ordinary submodule of the student, used only while distilling; the
module declares nothing else and the Trainer gets the plain strategy name (no ``find_unused_parameters``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import TinyNet, run_ddp_worker
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageScheduleCallback

SCHEDULE = [
    {"name": "finetune_first", "start_epoch": 0, "end_epoch": 1, "distillation": False, "lambda_coef": 0.0},
    {"name": "distill", "start_epoch": 1, "end_epoch": 2, "distillation": True, "lambda_coef": 1.0,
     "loss_weights": {"cls": 0.0}},
    {"name": "finetune_last", "start_epoch": 2, "end_epoch": 3, "distillation": False, "lambda_coef": 0.0},
]
MAX_EPOCHS = 3
N_SAMPLES = 16
BATCH_SIZE = 4  # per rank
LR = 0.1


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N_SAMPLES, 4, generator=g), torch.randint(0, 2, (N_SAMPLES,), generator=g))


def make_teacher() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


class Student(TinyNet):
    """The shared tiny net with two classes, feature hooks and an adapter; records what each step saw."""

    def __init__(self) -> None:
        super().__init__(classes=2, lr=LR)
        self.adapter = nn.Linear(8, 6)  # student features -> teacher features; used only while distilling
        self.seen: list[dict] = []

    def teacher(self) -> nn.Module:
        return make_teacher()

    def configure_feature_hooks(self):
        return {"student": ["body"], "teacher": ["1"]}

    def distill_losses(self, logits, x):
        distill = super().distill_losses(logits, x)
        if distill:
            distill.update(self.feature_losses(adapters={"body": self.adapter}))
        return distill

    def record(self, batch, batch_idx, loss):
        self.seen.append(
            {"epoch": self.current_epoch, "stage": self.stage_name, "distill": self.use_distillation,
             "lambda": self.lambda_coef, "weights": dict(self.loss_weights), "batch": len(batch[0])}
        )


class Record(pl.Callback):
    """Writes ``rank<N>.json`` at the end of training, in every process (also under ``ddp_spawn``)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[str] = []
        self.weights_by_epoch: dict[int, dict[str, list]] = {}

    def setup(self, trainer, pl_module, stage):
        lines = self.lines

        class ToList(logging.Handler):
            def emit(self, record):
                lines.append(record.getMessage())

        logging.getLogger("lightning_stages").addHandler(ToList())

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights_by_epoch[trainer.current_epoch] = {
            name: p.detach().flatten().tolist() for name, p in pl_module.named_parameters()
        }

    def on_train_end(self, trainer, pl_module):
        ddp = trainer.strategy.model
        teacher = pl_module.teachers["teacher"]
        teacher_ids = {id(p) for p in teacher.parameters()}
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "wrapper": type(ddp).__name__,
            "find_unused_parameters": getattr(ddp, "find_unused_parameters", None),
            "teacher_params_in_wrapper": sum(id(p) in teacher_ids for p in ddp.parameters()),
            "teacher_module_in_wrapper": any(m is teacher for m in ddp.modules()),
            "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
            "seen": pl_module.seen,
            "lines": [line for line in self.lines if line.startswith("epoch ")],
            "weights_by_epoch": self.weights_by_epoch,
            "global_step": trainer.global_step,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=args.strategy,
        max_epochs=MAX_EPOCHS,
        accumulate_grad_batches=args.accumulate,
        callbacks=[StageScheduleCallback(stage_schedule=SCHEDULE), Record(args.out)],
        logger=TensorBoardLogger(str(args.out), name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Student(), DataLoader(dataset(), batch_size=BATCH_SIZE))


if __name__ == "__main__":
    run_ddp_worker(main)
