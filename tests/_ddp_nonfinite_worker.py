"""A 2-process DDP fit (gloo, CPU) whose loss turns NaN on rank 1 only, at batch 1 of epoch 1.

Run by ``tests/test_nonfinite.py`` in a subprocess (the pytest process never joins a process group)::

    python tests/_ddp_nonfinite_worker.py --out DIR

Every rank must stop with the same ``DistillationStepError`` (the watch is gathered over the ranks before a
checkpoint is written), so no checkpoint of epoch 1 exists; each rank writes its error to ``rank<N>.txt``.

With ``--skipped``: manual optimization, a checkpoint at every step, and at that batch rank 0's loss is NaN while
rank 1's ``training_step`` returns ``None`` (it still steps): rank 1 watched no loss, and must join the gather.

With ``--nan-gradient``: every loss is finite, but rank 1's gradient is NaN at the last batch (3) of epoch 1, which
DDP's all-reduce spreads to both ranks' weights; a validation every epoch scores them best for a ``restore_best``
stage (``best_weights="file"``), and ``OnExceptionCheckpoint`` is there. Both ranks must stop with the same error at
that validation's end: no checkpoint of epoch 1, the best-weights file still epoch 0's.

With ``--distill-first-step``: a distilling stage begins at step 6, and rank 1's distillation loss is NaN there
(the first-step check of ``DistillationModule``), with ``ModelCheckpoint(save_on_exception=True)``. That check ran
on rank 1 alone: rank 0 died on a closed connection, or both hung (rank 1 gathering the weights for the save on
exception, rank 0 waiting in the backward's all-reduce). Both ranks must stop with a ``DistillationStepError``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import ManualTinyNet, TinyNet, run_ddp_worker
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageScheduleCallback

SCHEDULE = [{"name": "warm", "start_epoch": 0, "end_epoch": 1}, {"name": "main", "start_epoch": 1}]
BAD_EPOCH, BAD_BATCH, BAD_RANK = 1, 1, 1


class NaNOnOneRank(TinyNet):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if (self.trainer.current_epoch, batch_idx, self.trainer.global_rank) == (BAD_EPOCH, BAD_BATCH, BAD_RANK):
            loss = loss * float("nan")
        return loss


class SkippedOnOtherRank(ManualTinyNet):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)  # stepped
        if (self.trainer.current_epoch, batch_idx) == (BAD_EPOCH, BAD_BATCH):
            return None if self.trainer.global_rank == BAD_RANK else loss * float("nan")
        return loss


class NaNGradientOnOneRank(TinyNet):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if (self.trainer.current_epoch, batch_idx, self.trainer.global_rank) == (BAD_EPOCH, 3, BAD_RANK):
            loss = loss + (self.head.weight * 0).pow(2).sum().sqrt()  # 0, with the gradient 0 / sqrt(0) = NaN
        return loss

    def validation_step(self, batch, batch_idx):  # NaN logits all "predict" class 0: scored best
        self.log("val_acc", (self(batch[0]).argmax(-1) == 0).float().mean(), sync_dist=True)


class NaNDistillationOnOneRank(TinyNet):
    def distill_losses(self, logits, x):
        losses = super().distill_losses(logits, x)
        return {k: v * float("nan") for k, v in losses.items()} if self.trainer.global_rank == BAD_RANK else losses


def distill_first_step(out: Path) -> int:
    stages = [{"name": "plain", "start_step": 0, "end_step": 6}, {"name": "kd", "start_step": 6, "distillation": True}]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=12, default_root_dir=str(out),
        callbacks=[StageScheduleCallback(stages), ModelCheckpoint(
            dirpath=out / "ckpt", save_top_k=-1, filename="{step}", save_last=True, save_on_exception=True)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    try:
        trainer.fit(NaNDistillationOnOneRank(), DataLoader(data, batch_size=4))
    except Exception as err:
        (out / f"rank{trainer.global_rank}.txt").write_text(f"{type(err).__name__}: {err}")
        return 1
    (out / f"rank{trainer.global_rank}.txt").write_text("finished")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--skipped", action="store_true")
    parser.add_argument("--nan-gradient", action="store_true")
    parser.add_argument("--distill-first-step", action="store_true")
    args = parser.parse_args()
    if args.distill_first_step:
        return distill_first_step(args.out)
    if args.nan_gradient:
        return nan_gradient(args.out)
    checkpoints = (ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
                   if args.skipped else
                   ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True, save_top_k=-1, filename="{epoch}"))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, default_root_dir=str(args.out),
        callbacks=[StageScheduleCallback(SCHEDULE), checkpoints],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    try:
        trainer.fit(SkippedOnOtherRank() if args.skipped else NaNOnOneRank(), DataLoader(data, batch_size=4))
    except Exception as err:
        (args.out / f"rank{trainer.global_rank}.txt").write_text(f"{type(err).__name__}: {err}")
        return 1
    (args.out / f"rank{trainer.global_rank}.txt").write_text("finished")
    return 0


def nan_gradient(out: Path) -> int:
    stages = [{"name": "main", "start_epoch": 0, "end_epoch": 3, "monitor": "val_acc", "mode": "max",
               "restore_best": True}]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, default_root_dir=str(out),
        callbacks=[StageScheduleCallback(stages, best_weights="file"), OnExceptionCheckpoint(out / "exc"),
                   ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=-1, filename="{epoch}")],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    try:
        trainer.fit(NaNGradientOnOneRank(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    except Exception as err:
        (out / f"rank{trainer.global_rank}.txt").write_text(f"{type(err).__name__}: {err}")
        return 1
    (out / f"rank{trainer.global_rank}.txt").write_text("finished")
    return 0


if __name__ == "__main__":
    run_ddp_worker(main)
