"""A step schedule whose ``data`` changes at ``end_step`` under 2-process DDP on CPU (gloo); writes what each rank
built and trained. Run by ``tests/test_step_data.py`` in a subprocess:

    python tests/_ddp_step_data_worker.py --out DIR

kd trains on "all" (64 samples: 8 batches of 4 a rank an epoch) until step 5, where the epoch is cut; ft trains on
"labelled" (16 samples, ids from 1000: 2 batches a rank an epoch) until ``max_steps``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import TinyNet, run_ddp_worker
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageScheduleCallback

SIZES, OFFSETS = {"all": 64, "labelled": 16}, {"all": 0, "labelled": 1000}
SCHEDULE = [{"name": "kd", "start_step": 0, "end_step": 5, "data": "all"},
            {"name": "ft", "start_step": 5, "data": "labelled"}]
MAX_STEPS = 9


class Student(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.builds: list[tuple[int, str]] = []
        self.trained: list[tuple[int, int, str, list[int]]] = []

    def train_dataloader(self):
        self.builds.append((self.trainer.global_step, self.stage_data))
        n, offset = SIZES[self.stage_data], OFFSETS[self.stage_data]
        g = torch.Generator().manual_seed(offset)
        return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g),
                                        offset + torch.arange(n)), batch_size=4)

    def record(self, batch, batch_idx, loss):
        self.trained.append((self.global_step, self.current_epoch, self.stage_name, batch[2].tolist()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = Student()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=-1, max_steps=MAX_STEPS,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[StageScheduleCallback(SCHEDULE, verbose=False)])
    trainer.fit(model)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"builds": model.builds,
                                                                         "trained": model.trained}))


if __name__ == "__main__":
    run_ddp_worker(main)
