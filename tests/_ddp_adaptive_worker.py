"""A plateau-ended, ``restore_best`` stage with its own data under 2-process DDP on CPU (gloo); writes what each
rank saw. Run by ``tests/test_adaptive_ddp.py`` in a subprocess:

    python tests/_ddp_adaptive_worker.py --out DIR [--best-weights memory|file] [--unit epoch|step]

Each rank logs its own ``val/score`` (``SCRIPTS[rank][epoch]``, not synced), so a decision taken on one rank's
values alone would differ between the ranks. ``--unit step``: the same in optimizer steps, in one long epoch with a
validation every ``STEP_EVERY`` steps (``STEP_SCRIPTS[rank][validation]``), and one ``data`` throughout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import TinyNet, run_ddp_worker
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageScheduleCallback

# alone, rank 0 would end kd after epoch 2 and rank 1 after epoch 1; their mean (5, 4.5, 4, 4.2) improves until
# epoch 2, its best, and kd runs to its cap (4)
SCRIPTS = {0: [5.0, 4.0, 4.0, 4.0, 4.0], 1: [5.0, 5.0, 4.0, 4.4, 4.0]}
SCHEDULE = [
    {"name": "kd", "start_epoch": 0, "end_epoch": 4, "distillation": True, "monitor": "val/score", "patience": 1,
     "restore_best": True, "data": "all"},
    {"name": "ft", "start_epoch": 4, "end_epoch": 5, "data": "labelled"},
]
MAX_EPOCHS = 5
SIZES = {"all": 16, "labelled": 8}

# validations at steps 2, 4, ..., 12. Alone, rank 0 would end kd at step 4 and rank 1 at step 6; their mean
# (5, 4.5, 4, 4.1) last improves at step 6 and kd ends at step 8, before its cap (10)
STEP_EVERY, MAX_STEPS = 2, 12
STEP_SCRIPTS = {0: [5.0, 5.0, 3.0, 3.2, 1.0, 1.0], 1: [5.0, 4.0, 5.0, 5.0, 1.0, 1.0]}
STEP_SCHEDULE = [
    {"name": "kd", "start_step": 0, "end_step": 10, "distillation": True, "monitor": "val/score", "patience": 1,
     "restore_best": True, "data": "all"},
    {"name": "ft", "start_step": 10, "data": "all"},
]


class Student(TinyNet):
    def __init__(self, unit: str = "epoch") -> None:
        super().__init__(momentum=0.9)
        self.unit = unit
        self.stage_of: dict[int, str] = {}
        self.builds: list[str] = []
        self.batches: dict[int, int] = {}

    def train_dataloader(self):
        self.builds.append(self.stage_data)
        g = torch.Generator().manual_seed(0)
        n = SIZES[self.stage_data] if self.unit == "epoch" else 2 * 4 * MAX_STEPS  # one epoch: 2 ranks, 4 a batch
        return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                          batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), batch_size=2)

    def record(self, batch, batch_idx, loss):
        self.stage_of[self.current_epoch if self.unit == "epoch" else self.global_step] = self.stage_name
        self.batches[self.current_epoch] = self.batches.get(self.current_epoch, 0) + 1

    def validation_step(self, batch, batch_idx):
        if self.unit == "step":
            self.log("val/score", STEP_SCRIPTS[self.global_rank][self.global_step // STEP_EVERY - 1])
        else:
            self.log("val/score", SCRIPTS[self.global_rank][self.current_epoch])


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.weights: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights[f"start{trainer.current_epoch}"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after the stage callback's
        if pl_module.unit == "step":
            self.weights[f"step{trainer.global_step}"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            at = trainer.current_epoch if pl_module.unit == "epoch" else trainer.global_step
            self.weights[f"val{at}"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        torch.save({"stage_of": pl_module.stage_of, "builds": pl_module.builds, "batches": pl_module.batches,
                    "weights": self.weights, "transitions": trainer.callbacks[0].adaptive.transitions},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--best-weights", default="memory")
    parser.add_argument("--unit", default="epoch")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    steps = args.unit == "step"
    limits = ({"max_epochs": -1, "max_steps": MAX_STEPS, "val_check_interval": STEP_EVERY,
               "check_val_every_n_epoch": None} if steps else {"max_epochs": MAX_EPOCHS})
    callback = StageScheduleCallback(STEP_SCHEDULE if steps else SCHEDULE, verbose=False, best_weights=args.best_weights)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", default_root_dir=args.out, callbacks=[callback, Record(args.out)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **limits,
    )
    trainer.fit(Student(args.unit))


if __name__ == "__main__":
    run_ddp_worker(main)
