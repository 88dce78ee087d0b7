"""Trains the DDP test's student on 2 CPU processes (gloo) under a schedule in optimizer steps with a ramp, and writes
what each rank saw at every batch to ``rank<N>.json``.

Run by ``tests/test_ddp.py`` in a subprocess:

    python tests/_steps_ddp_worker.py --out DIR

distill for steps [0, 3), then finetune from step 3 with a 3-step linear ramp out of distillation; 4 batches per
epoch per rank, ``accumulate_grad_batches=2`` (2 optimizer steps per epoch), ``max_steps=8`` with ``max_epochs=-1``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
from _ddp_worker import BATCH_SIZE, Student, dataset
from conftest import run_ddp_worker
from torch.utils.data import DataLoader

from lightning_stages import StageScheduleCallback

SCHEDULE = [
    {"name": "distill", "start_step": 0, "end_step": 3, "distillation": True, "lambda_coef": 1.0,
     "loss_weights": {"cls": 0.0}},
    {"name": "finetune", "start_step": 3, "distillation": False, "lambda_coef": 0.0, "ramp_steps": 3},
]
MAX_STEPS, ACCUMULATE = 8, 2


class StepStudent(Student):
    def record(self, batch, batch_idx, loss):
        self.seen.append({"step": self.trainer.global_step, "epoch": self.current_epoch, "batch_idx": batch_idx,
                          "stage": self.stage_name, "distill": self.use_distillation, "lambda": self.lambda_coef,
                          "weights": dict(self.loss_weights)})


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        result = {"rank": trainer.global_rank, "seen": pl_module.seen, "global_step": trainer.global_step}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=MAX_STEPS, max_epochs=-1,
        accumulate_grad_batches=ACCUMULATE, callbacks=[StageScheduleCallback(stage_schedule=SCHEDULE), Record(args.out)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(StepStudent(), DataLoader(dataset(), batch_size=BATCH_SIZE))


if __name__ == "__main__":
    run_ddp_worker(main)
