"""``compare_throughput_ratio``: runs per hour of ``lightning-stages compare --jobs 2`` over ``--jobs 1``, as a user
sees them.

Each comparison is the whole command, ``python -m lightning_stages.cli.main compare A B --seeds 2 --jobs J``, in a
fresh process, timed from its start to its exit: the start-up of the ``compare`` process (importing torch and
Lightning) counts on both sides, and with ``--jobs 2`` also the start-up of the two worker processes. Each comparison
writes into its own new ``--out``, so no run is reused.

What is compared: 2 schedules x 2 seeds of the demo's own runs, ``configs/segmentation_distill_finetune.yaml`` and
``configs/segmentation_labels_only.yaml`` unchanged (9 epochs, the demo's data: 2048 training images of 32x32 with
10 % labelled, 256 validation and 512 test images) except for no logger and no checkpoints, against the demo's
teacher architecture (written first and trained for one step: its weights do not change the cost of its forward).
They are the two ends of the demo's question: a schedule that runs the teacher (3 epochs on all images, then 6 on
the labelled ones) and one that never does. Sizes: a user's comparison is made of runs like these; the demo's took
30-40 s each with ``--jobs 2``. Much shorter runs would measure the start-up of processes (5-8 s to import torch and
Lightning, once in ``compare`` and once more in each worker) instead of the training a user waits for. With
``quick``, the runs are cut to 3 epochs (the stage boundary at a third, as in the demo).

The comparisons run in the order 2, 1, 1, 2 (``repetitions`` = 2), so that a slow drift of the machine cancels; the
ratio is of the summed wall times (the same number of runs on each side).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("distill_finetune", "labels_only")
SEEDS = 2
TEACHER = {"widths": [16, 32, 104], "convs_per_block": 2}  # configs/segmentation_teacher.yaml


def write_configs(folder: Path, epochs: int) -> list[Path]:
    """The teacher checkpoint and the two student configs at ``epochs`` (the demo's 9: as shipped), the stage boundary
    at a third."""
    import lightning.pytorch as pl
    import yaml

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples.segmentation import SegmentationTeacher, ShapesDataModule

    teacher_path = folder / "teacher.ckpt"
    trainer = pl.Trainer(max_steps=1, enable_checkpointing=False, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(SegmentationTeacher(**TEACHER),  # type: ignore[arg-type]
                datamodule=ShapesDataModule(num_train=64, num_val=32, num_test=32, image_size=32))
    trainer.save_checkpoint(teacher_path)
    configs = []
    for name in SCHEDULES:
        config = yaml.safe_load((ROOT / "configs" / f"segmentation_{name}.yaml").read_text())
        config["trainer"].update(max_epochs=epochs, logger=False, enable_checkpointing=False)
        stages = config["trainer"]["callbacks"][0]["init_args"]["stage_schedule"]
        bounds = [0, epochs // 3, epochs][:: 1 if len(stages) == 2 else 2]
        for stage, start, end in zip(stages, bounds, bounds[1:]):
            stage["start_epoch"], stage["end_epoch"] = start, end
        config["model"]["init_args"]["teacher_checkpoint"] = str(teacher_path)
        configs.append(folder / f"bench_{name}.yaml")
        configs[-1].write_text(yaml.safe_dump(config))
    return configs


def time_compare(configs: list[Path], jobs: int, out: Path) -> dict[str, Any]:
    """Wall time of one whole ``compare`` command, and the seconds of each of its runs (from ``result.json``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "lightning_stages.cli.main", "compare", *map(str, configs), "--seeds",
               str(SEEDS), "--jobs", str(jobs), "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"compare --jobs {jobs} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    runs = {str(p.relative_to(out / "runs").parent): json.loads(p.read_text())["seconds"]
            for p in sorted(out.glob("runs/*/*/result.json"))}
    if len(runs) != len(SCHEDULES) * SEEDS:
        raise RuntimeError(f"compare --jobs {jobs} wrote {len(runs)} results, expected {len(SCHEDULES) * SEEDS}")
    return {"jobs": jobs, "seconds": seconds, "run_seconds": runs}


def compare_throughput_ratio(quick: bool = False, repetitions: int = 2) -> tuple[float, dict[str, Any]]:
    """Runs per hour with ``--jobs 2`` / with ``--jobs 1``: the summed wall times of ``repetitions`` comparisons each,
    in alternating order (2, 1, 1, 2, ...). Returns the ratio and the raw timings."""
    epochs = 3 if quick else 9
    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = write_configs(Path(tmp), epochs)
        for i in range(repetitions):
            for jobs in (2, 1) if i % 2 == 0 else (1, 2):
                timing = time_compare(configs, jobs, Path(tmp) / f"out{len(timings)}")
                timings.append(timing)
                print(f"  compare --jobs {jobs}: {timing['seconds']:.1f} s (runs: "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in timing["run_seconds"].items()) + ")", flush=True)
    total = {jobs: sum(t["seconds"] for t in timings if t["jobs"] == jobs) for jobs in (1, 2)}
    runs = repetitions * len(SCHEDULES) * SEEDS
    print(f"compare {len(SCHEDULES)} schedules x {SEEDS} seeds, {epochs} epochs, {repetitions} times each: "
          f"--jobs 1 {total[1]:.1f} s ({runs / total[1] * 3600:.0f} runs/hour), --jobs 2 {total[2]:.1f} s "
          f"({runs / total[2] * 3600:.0f} runs/hour)", flush=True)
    return total[1] / total[2], {"epochs": epochs, "comparisons": timings, "total_seconds": total}
