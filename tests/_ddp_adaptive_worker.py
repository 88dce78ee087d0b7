"""A plateau-ended, ``restore_best`` stage with its own data under 2-process DDP on CPU (gloo); writes what each
rank saw. Run by ``tests/test_adaptive_ddp.py`` in a subprocess:

    python tests/_ddp_adaptive_worker.py --out DIR [--best-weights memory|file]

Each rank logs its own ``val/score`` (``SCRIPTS[rank][epoch]``, not synced), so a decision taken on one rank's
values alone would differ between the ranks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import TinyNet
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


class Student(TinyNet):
    def __init__(self) -> None:
        super().__init__(momentum=0.9)
        self.stage_of: dict[int, str] = {}
        self.builds: list[str] = []
        self.batches: dict[int, int] = {}

    def train_dataloader(self):
        self.builds.append(self.stage_data)
        g = torch.Generator().manual_seed(0)
        n = SIZES[self.stage_data]
        return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                          batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), batch_size=2)

    def record(self, batch, batch_idx, loss):
        self.stage_of[self.current_epoch] = self.stage_name
        self.batches[self.current_epoch] = self.batches.get(self.current_epoch, 0) + 1

    def validation_step(self, batch, batch_idx):
        self.log("val/score", SCRIPTS[self.global_rank][self.current_epoch])


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.weights: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights[f"start{trainer.current_epoch}"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.weights[f"val{trainer.current_epoch}"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        torch.save({"stage_of": pl_module.stage_of, "builds": pl_module.builds, "batches": pl_module.batches,
                    "weights": self.weights, "transitions": trainer.callbacks[0].adaptive.transitions},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--best-weights", default="memory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=MAX_EPOCHS, default_root_dir=args.out,
        callbacks=[StageScheduleCallback(SCHEDULE, verbose=False, best_weights=args.best_weights), Record(args.out)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Student())


if __name__ == "__main__":
    main()
