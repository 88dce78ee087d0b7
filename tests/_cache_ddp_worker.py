"""Processes that share one teacher cache directory, for ``tests/test_teacher_cache.py``.

* ``python tests/_cache_ddp_worker.py --out DIR --cache DIR``: a 2-rank DDP fit (CPU, gloo) that distills for three
  epochs with ``TeacherCache(directory=...)`` and writes, per rank, every teacher value the steps used.
* :func:`hammer`, :func:`die_mid_write`, :func:`die_mid_drop`: targets of ``multiprocessing`` (fork) processes that
  race on a directory or kill themselves with SIGKILL at a fixed point. Each first sets one torch thread: OpenMP's
  thread pool does not survive a fork.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from conftest import run_ddp_worker
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import DistillationModule, IndexedDataset, StageScheduleCallback, TeacherCache
from lightning_stages.distillation import teacher_cache_directory
from lightning_stages.losses import logit_kd

N_SAMPLES, BATCH_SIZE, EPOCHS = 32, 4, 2  # batch size per rank


def inputs() -> torch.Tensor:
    return torch.randn(N_SAMPLES, 5, generator=torch.Generator().manual_seed(0))


def make_teacher(seed: int = 7) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def reference(teacher: nn.Module, index: list[int]) -> torch.Tensor:
    """What the teacher gives for the samples ``index``, one sample at a time (independent of batching)."""
    x = inputs()
    with torch.no_grad():
        return torch.cat([teacher(x[i : i + 1]) for i in index])


class Student(DistillationModule, pl.LightningModule):
    def __init__(self, cache_directory: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(5, 3)
        self.loss_weights = {"cls": 1.0}
        self.teacher_cache = TeacherCache(cache_directory)
        self.seen: list[dict] = []
        self.teacher_calls = 0

    def configure_teachers(self):
        teacher = make_teacher()
        teacher.register_forward_pre_hook(lambda *_: setattr(self, "teacher_calls", self.teacher_calls + 1))
        return {"teacher": teacher}

    def configure_feature_hooks(self):
        return {"teacher": ["1"]}

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self.net(x)
        teacher_logits = self.run_teachers(x, sample_index=index)["teacher"]
        self.seen.append({"epoch": self.current_epoch, "index": index.tolist(), "logits": teacher_logits.tolist(),
                          "hidden": self.captured_features("teacher")["1"].tolist()})
        return self.weighted_loss({"cls": F.cross_entropy(logits, y)}, {"kd": logit_kd(logits, teacher_logits)})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        result = {"rank": trainer.global_rank, "seen": pl_module.seen, "teacher_calls": pl_module.teacher_calls}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", required=True)
    args = parser.parse_args()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[StageScheduleCallback(stage_schedule=[{"name": "distill", "start_epoch": 0, "distillation": True}],
                                         verbose=False), Record(args.out)],
    )
    labels = torch.randint(0, 3, (N_SAMPLES,), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(IndexedDataset(TensorDataset(inputs(), labels)), batch_size=BATCH_SIZE, shuffle=True)
    trainer.fit(Student(args.cache), loader)


# ------------------------------------------------------------------------------------------ multiprocessing targets


def hammer(directory: str, runs: list[tuple[int, torch.dtype | None]], rounds: int, barrier, results) -> None:
    """Look up and store random batches on ``directory`` with one cache per ``(teacher seed, stored dtype)``, taking
    turns, while another process does the same; report the largest difference between a value read and the
    teacher of that cache."""
    torch.set_num_threads(1)  # a forked child: OpenMP's threads did not survive the fork (as in DataLoader workers)
    x = inputs()
    caches = []
    with torch.no_grad():
        for seed, dtype in runs:
            teacher = make_teacher(seed)
            expected = teacher(x) if dtype is None else teacher(x).to(dtype).float()
            cache = TeacherCache(directory, dtype=dtype, num_samples=N_SAMPLES)
            cache.bind(str(seed))
            caches.append((teacher, expected, cache, {"seed": seed, "dtype": str(dtype), "worst": 0.0, "hits": 0}))
        order = torch.Generator().manual_seed(os.getpid())
        barrier.wait()
        for _ in range(rounds):
            for teacher, expected, cache, report in caches:
                index = torch.randperm(N_SAMPLES, generator=order)[:BATCH_SIZE]
                found = cache.lookup(index, inputs=x[index])
                if found is None:
                    cache.store(index, {"t": teacher(x[index])}, {}, inputs=x[index])
                else:
                    report["hits"] += 1
                    report["worst"] = max(report["worst"], float((found[0]["t"] - expected[index]).abs().max()))
    results.put([report for *_, report in caches])


def die_mid_write(directory: str) -> None:
    """Store samples 0-7, then die (SIGKILL) with half of the next batch's bytes (and 3 more) on disk."""
    torch.set_num_threads(1)
    teacher, x = make_teacher(), inputs()
    cache = TeacherCache(directory)
    cache.bind("kill")
    with torch.no_grad():
        cache.store(list(range(8)), {"t": teacher(x[:8])}, {}, inputs=x[:8])
        write = os.write

        def half_then_die(fd, data):
            write(fd, bytes(data)[: len(data) // 2 + 3])
            os.kill(os.getpid(), signal.SIGKILL)

        os.write = half_then_die  # this process only lives to die here
        cache.store(list(range(8, 16)), {"t": teacher(x[8:16])}, {}, inputs=x[8:16])


def die_mid_drop(directory: str) -> None:
    """Bind another key, and die (SIGKILL) right after the first shard of the old key is deleted."""
    torch.set_num_threads(1)
    remove = teacher_cache_directory.remove_file

    def remove_then_die(path: str) -> None:
        remove(path)
        if path.endswith(".rows"):
            os.kill(os.getpid(), signal.SIGKILL)

    teacher_cache_directory.remove_file = remove_then_die
    TeacherCache(directory).bind("another teacher")


if __name__ == "__main__":
    run_ddp_worker(main)
