"""What each stage costs: the plugin against a plain LightningModule, on CPU, in one process.

Run it by hand (it is not part of the test suite)::

    python benchmarks/run.py [--quick] [--json PATH] [--threads N] [--only NAME [--parts]]

Everything runs with one torch thread unless ``--threads`` says otherwise: on a shared 2-core machine, two threads
per process make any other running process stall whole epochs (10x and more), while one thread keeps the spread of
epoch times within a few percent. Every variant runs with the same setting, so the ratios compare like with like.

Variants, each a real ``Trainer.fit`` on the same synthetic, deterministic batches:

* ``plain``: a plain LightningModule (the student alone, no plugin, no teacher), 6 epochs.
* ``plugin``: the same student with ``DistillationModule`` and ``StageScheduleCallback``, a teacher with about 10x
  the student's parameters, one hooked feature layer per model, logit KD + feature MSE while distilling. Schedule:
  ``distill`` for epochs [0, 3), ``finetune`` (no distillation) for [3, 6).
* ``teacher``: the same batches through the teacher alone under ``torch.no_grad()`` (timed separately), 3 passes.
* ``cached``: ``plugin`` with a ``TeacherCache`` (in memory) and distillation for epochs [0, 6): epoch 0 runs the
  teacher and fills the cache, epochs 1-5 read it.
* ``handwritten``: a reference without the plugin, a plain LightningModule that always runs the teacher and the same
  losses (what one writes by hand for a distill-only run), 3 epochs; it shows what distillation itself costs here.

Each repetition runs every variant once, in alternating order (A B C D E, then E D C B A, ...); a warm-up
repetition is discarded. Within a fit, the first epoch of each kind is a warm-up and not timed: timed are plain
epochs 1-5, plugin distill epochs 1-2 and finetune epochs 3-5 (the first one, right after the switch, included),
cached epochs 1-5, hand-written epochs 1-2 and teacher passes 2-3. Per repetition a measurement is the median of its
timed epochs. Each ratio is the median, over repetitions, of the variant's measurement divided by its reference's
in the same repetition (one after the other, so that the slowest drifts of the machine cancel):

* ``off_stage_ratio``: plugin finetune epoch / plain epoch. Target <= 1.02.
* ``distill_stage_ratio``: plugin distill epoch / (plain epoch + teacher pass). Target <= 1.05.
* ``cached_distill_ratio``: cached epoch (read from the cache) / plain epoch, measured side by side
  (:func:`cached_side_by_side`: a plain, a second plain and a cached fit in threads taking turns one step each, on
  one CPU; ``side_by_side.py``), not from the repetitions above, whose separate fits move it by several percent
  either way (their ratio stays in the JSON as ``cached_separate_fits_ratio``). Target <= 1.05. With ``--only
  cached_distill_ratio --parts``, the fits of :data:`PARTS` (the losses without the plugin, offline distillation
  written by hand without and with the cache's input check, the read alone, the cached fit without the input check)
  run in the same turns, each with its ratio to the plain fit.
* ``checkpoint_size_ratio``: bytes of the plugin's checkpoint / the plain one's (same student). Target <= 1.01.
* ``large_config_ratio``: seconds to check a 49 MB JSON config as ``lightning-stages validate`` does (read, parse,
  check duplicate keys and limits, build and bind the schedule) / seconds to read it and ``json.loads`` it, median of
  paired repetitions (:func:`run_large_config`). Target <= 2.
* ``compare_throughput_ratio``: runs per hour of ``lightning-stages compare --jobs 2`` over ``--jobs 1``, each the
  whole command in a fresh process (start-up counted on both sides), on 2 schedules x 2 seeds of the demo's runs
  (9 epochs) (see ``benchmarks/compare_throughput.py``). Target >= 1.5. It ignores ``--threads``: ``compare`` gives
  each job its share of the cores, as for a user.
* ``stage_switch_us``: median microseconds of ``StageScheduleCallback.on_train_epoch_start`` (resolve the stage,
  apply it, attach or remove the hooks, log the stage line) in a fit whose stage changes every epoch. Target < 500.
* ``step_schedule_ratio``: an epoch under a schedule in optimizer steps with no ramp (``steps`` variant) / the same
  epoch under the same schedule in epochs (``epochs`` variant); neither distills, so the per-batch check is as
  visible as it can be. Target <= 1.01.
* ``ramp_ratio``: an epoch through which a ramp of the loss weights runs (``ramp`` variant: the values are resolved
  and written before every batch) / the same epoch of the ``epochs`` variant. Target <= 1.02.

An epoch is timed from the first ``on_train_epoch_start`` to ``on_train_epoch_end`` (callbacks run in list order,
and the timer is first), so it includes the stage application, every training step and the optimizer.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from compare_throughput import compare_throughput_ratio
from lightning.pytorch.callbacks import Callback
from side_by_side import side_by_side
from torch import nn

from lightning_stages import DistillationModule, StageScheduleCallback, TeacherCache
from lightning_stages.distillation.teacher_cache_inputs import input_fingerprints  # only in offline_checked
from lightning_stages.losses import feature_mse, logit_kd  # feature_mse: only in the references without the plugin

TARGETS = {
    "off_stage_ratio": ("<=", 1.02),
    "distill_stage_ratio": ("<=", 1.05),
    "cached_distill_ratio": ("<=", 1.05),
    "checkpoint_size_ratio": ("<=", 1.01),
    "stage_switch_us": ("<", 500.0),
    "large_config_ratio": ("<=", 2.0),
    "step_schedule_ratio": ("<=", 1.01),
    "ramp_ratio": ("<=", 1.02),
    "compare_throughput_ratio": (">=", 1.5),
}

# sizes: a student step takes milliseconds; the teacher has about 10x the student's parameters
IN_FEATURES, CLASSES, NECK = 512, 10, 256
STUDENT_WIDTH = 768
TEACHER_WIDTH, TEACHER_DEPTH = 1632, 5

SETTINGS = {
    "full": {"repetitions": 11, "batches": 12, "batch_size": 256, "switch_epochs": 24, "side_by_side_runs": 11},
    "quick": {"repetitions": 5, "batches": 6, "batch_size": 256, "switch_epochs": 12, "side_by_side_runs": 5},
}


def mlp(width: int, depth: int) -> nn.Sequential:
    """``depth`` hidden layers of ``width``, then a ``neck`` (hooked for feature distillation), then the head."""
    layers: list[tuple[str, nn.Module]] = []
    inputs = IN_FEATURES
    for i in range(depth):
        layers += [(f"fc{i}", nn.Linear(inputs, width)), (f"act{i}", nn.ReLU())]
        inputs = width
    layers += [("neck", nn.Linear(inputs, NECK)), ("neck_act", nn.ReLU()), ("head", nn.Linear(NECK, CLASSES))]
    return nn.Sequential(OrderedDict(layers))


def make_student() -> nn.Sequential:
    torch.manual_seed(1)
    return mlp(STUDENT_WIDTH, 2)


def make_teacher() -> nn.Sequential:
    torch.manual_seed(2)
    return mlp(TEACHER_WIDTH, TEACHER_DEPTH).eval().requires_grad_(False)


def make_batches(batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Deterministic synthetic batches ``(x, y, sample index)`` in a shuffled (seeded) order."""
    generator = torch.Generator().manual_seed(0)
    n = batches * batch_size
    x = torch.randn(n, IN_FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    order = torch.randperm(n, generator=generator)
    return [(x[i], y[i], i) for i in order.split(batch_size)]


class PlainStudent(pl.LightningModule):
    """The reference: the student as a plain LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_student()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class PluginStudent(DistillationModule, PlainStudent):
    """The same student with the plugin: a teacher, one hooked layer per model, logit KD and feature MSE."""

    def __init__(self, cache: TeacherCache | None = None) -> None:
        super().__init__()
        self.loss_weights = {"cls": 1.0}
        self.teacher_cache = cache

    def configure_teachers(self) -> dict[str, nn.Module]:
        return {"teacher": make_teacher()}

    def configure_feature_hooks(self) -> dict[str, list[str]]:
        return {"student": ["net.neck"], "teacher": ["neck"]}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        logits = self(x)
        distill = {}
        if self.use_distillation:
            teacher_logits = self.run_teachers(x, sample_index=index)["teacher"]
            distill["kd"] = logit_kd(logits, teacher_logits, temperature=2.0)
            distill.update(self.feature_losses())  # "net.neck__teacher.neck", mean squared error
        return self.weighted_loss({"cls": F.cross_entropy(logits, y)}, distill)


class HandwrittenKD(PlainStudent):
    """A reference without the plugin: what one writes by hand for a distill-only run (teacher always on)."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["teacher"] = make_teacher()  # not a submodule: kept out of the checkpoint and the optimizer
        self.features: dict[str, torch.Tensor] = {}
        self.net.neck.register_forward_hook(lambda m, i, o: self.features.__setitem__("student", o))
        self.teacher.neck.register_forward_hook(lambda m, i, o: self.features.__setitem__("teacher", o))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        logits = self(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return (F.cross_entropy(logits, y) + logit_kd(logits, teacher_logits, temperature=2.0)
                + feature_mse(self.features["student"], self.features["teacher"]))


class EpochTimer(Callback):
    """Seconds per training epoch (first in the callback list, so the stage application is inside)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


class TimedStageCallback(StageScheduleCallback):
    """The real callback, timing each epoch-start stage resolution and application."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nanoseconds: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter_ns()
        super().on_train_epoch_start(trainer, pl_module)
        self.nanoseconds.append(time.perf_counter_ns() - start)


def fit(model: pl.LightningModule, batches: list, epochs: int, callbacks: list[Callback],
        checkpoint: str | None = None) -> list[float]:
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[timer, *callbacks], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    gc.collect()
    trainer.fit(model, train_dataloaders=loader)
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
    return timer.seconds


DISTILL_THEN_FINETUNE = [
    {"name": "distill", "start_epoch": 0, "end_epoch": 3, "distillation": True},
    {"name": "finetune", "start_epoch": 3, "end_epoch": 6, "distillation": False},
]

# each run returns {measurement: seconds of its timed epochs}; epoch 0 of each kind is a warm-up and not timed


def run_plain(batches: list, checkpoint: str | None = None) -> dict[str, list[float]]:
    seconds = fit(PlainStudent(), batches, 6, [], checkpoint)
    return {"plain": seconds[1:]}


def run_plugin(batches: list, checkpoint: str | None = None) -> dict[str, list[float]]:
    callback = StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE)
    seconds = fit(PluginStudent(), batches, 6, [callback], checkpoint)
    # every finetune epoch is timed, the first one (right after the switch) included
    return {"plugin_distill": seconds[1:3], "plugin_finetune": seconds[3:6]}


# the cached fit: 6 epochs, as many as the plain fit: epoch 0 fills the cache, epochs 1-5 read it and are timed, so
# both sides of cached_distill_ratio are the median of 5 epochs
CACHED_SCHEDULE = [{"name": "distill", "start_epoch": 0, "end_epoch": 6, "distillation": True}]


def check_cache_read(model: PluginStudent, batches: list) -> None:
    """The cached fit ran the teacher at epoch 0 only and read every later batch from the cache."""
    cache = model.teacher_cache
    assert cache is not None and cache.hits == 5 * len(batches) and cache.misses == len(batches), "cache not used"


def run_cached(batches: list) -> dict[str, list[float]]:
    model = PluginStudent(cache=TeacherCache())
    seconds = fit(model, batches, 6, [StageScheduleCallback(stage_schedule=CACHED_SCHEDULE)])
    check_cache_read(model, batches)
    return {"cached_fill": seconds[:1], "cached": seconds[1:]}


def _fit_with(model: pl.LightningModule, batches: list, callbacks: list[Callback], timer: Callback) -> None:
    fit(model, batches, 6, [timer, *callbacks])


class LossesOnly(PlainStudent):
    """A reference without the plugin (``--parts``): the plain student plus the cached fit's losses, ``logit_kd`` and
    the feature MSE, against fixed tensors of the teacher's shapes (what the losses cost whoever stores the outputs)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.teacher_logits = torch.randn(SETTINGS["full"]["batch_size"], CLASSES, generator=generator)
        self.teacher_neck = torch.randn(SETTINGS["full"]["batch_size"], NECK, generator=generator)
        self.neck: dict[str, torch.Tensor] = {}
        self.net.neck.register_forward_hook(lambda m, i, o: self.neck.__setitem__("student", o))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        logits = self(x)
        return (F.cross_entropy(logits, y) + logit_kd(logits, self.teacher_logits[:len(y)], temperature=2.0)
                + feature_mse(self.neck["student"], self.teacher_neck[:len(y)]))


class ReadOnly(PluginStudent):
    """The cached fit's read alone (``--parts``): ``run_teachers`` from the cache (the input checksum, the rows, the
    features put into the hooks), then the task loss only."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        logits = self(x)
        if self.use_distillation:
            self.run_teachers(x, sample_index=index)
        return self.weighted_loss({"cls": F.cross_entropy(logits, y)})


class UncheckedCache(TeacherCache):
    """A ``TeacherCache`` whose reads skip the input check (``--parts``: what the check costs; never for training,
    where a row stored for another input would be served)."""

    def lookup(self, sample_index: Any, device: Any = None, inputs: Any = None) -> Any:
        return super().lookup(sample_index, device, None)


def teacher_outputs(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits and neck features of every sample, row ``i`` for sample index ``i``."""
    teacher = make_teacher()
    rows = sum(len(index) for _, _, index in batches)
    logits, features = torch.empty(rows, CLASSES), torch.empty(rows, NECK)
    captured: dict[str, torch.Tensor] = {}
    teacher.neck.register_forward_hook(lambda module, args, output: captured.__setitem__("neck", output))
    with torch.no_grad():
        for x, _, index in batches:
            logits[index] = teacher(x)
            features[index] = captured["neck"]
    return logits, features


class OfflineKD(PlainStudent):
    """A reference without the plugin (``--parts``): offline distillation written by hand. The cached fit's losses
    against the teacher's own logits and neck features, computed for every sample before the fit and gathered by the
    batch's sample indices. With ``check_inputs`` it also takes the input checksum the cache takes at every read
    (``input_fingerprints``) and compares it with the checksum of the input each row was computed from: the floor of
    a cache with the input check and nothing else of the plugin."""

    def __init__(self, batches: list, check_inputs: bool = False) -> None:
        super().__init__()
        self.teacher_logits, self.teacher_neck = teacher_outputs(batches)
        self.input_sums = torch.zeros(len(self.teacher_logits), dtype=torch.int64)
        for x, _, index in batches:
            self.input_sums[index] = input_fingerprints(((x,), {}), len(index))
        self.check_inputs = check_inputs
        self.neck: dict[str, torch.Tensor] = {}
        self.net.neck.register_forward_hook(lambda m, i, o: self.neck.__setitem__("student", o))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        logits = self(x)
        if self.check_inputs and not torch.equal(input_fingerprints(((x,), {}), len(index)),
                                                 self.input_sums.index_select(0, index)):
            raise RuntimeError("offline_checked: a batch is not the input the teacher's outputs were computed from")
        return (F.cross_entropy(logits, y)
                + logit_kd(logits, self.teacher_logits.index_select(0, index), temperature=2.0)
                + feature_mse(self.neck["student"], self.teacher_neck.index_select(0, index)))


# --parts: the fits run side by side with the three of cached_distill_ratio: (student, its callbacks) for the batches
PARTS: dict[str, Callable[[list], tuple[pl.LightningModule, list[Callback]]]] = {
    "losses": lambda batches: (LossesOnly(), []),
    "offline": lambda batches: (OfflineKD(batches), []),
    "offline_checked": lambda batches: (OfflineKD(batches, check_inputs=True), []),
    "read": lambda batches: (ReadOnly(cache=TeacherCache()), [StageScheduleCallback(stage_schedule=CACHED_SCHEDULE)]),
    "unchecked": lambda batches: (PluginStudent(cache=UncheckedCache()),
                                  [StageScheduleCallback(stage_schedule=CACHED_SCHEDULE)]),
}


def cached_side_by_side(batches: list, runs: int, threads: int, parts: bool = False) -> tuple[float, dict[str, Any]]:
    """``cached_distill_ratio``: ``runs`` times, a plain fit, a second plain fit (the control) and a cached fit
    (``run_cached``'s) side by side (``side_by_side.py``: threads taking turns one step each, on one CPU per torch
    thread), 6 epochs each. An epoch's time is the sum of its steps' turns; per run, the median of epochs 1-5 of the
    cached fit over the plain fit's; the median over runs. The control's ratio shows how well the protocol agrees
    with itself. With ``parts``, the fits of :data:`PARTS` run in the same turns, each with its ratio to plain."""
    names = ["plain", "control", "cached", *(PARTS if parts else ())]
    keys = {name: "cached_distill_ratio" if name == "cached" else f"{name}_ratio" for name in names[1:]}
    ratios: dict[str, list[float]] = {key: [] for key in keys.values()}
    epoch_ms: dict[str, list[list[float]]] = {name: [] for name in names}
    step_ms: dict[str, list[float]] = {name: [] for name in names}
    for run in range(runs + 1):  # the first run is a warm-up
        # the students are made here, one after the other: made in the fits' threads at once, the seeded global
        # generator would give them different weights (the teacher, made in the cached fit's setup, is the only
        # model left to a thread)
        made: dict[str, tuple[pl.LightningModule, list[Callback]]] = {
            "plain": (PlainStudent(), []), "control": (PlainStudent(), []),
            "cached": (PluginStudent(cache=TeacherCache()), [StageScheduleCallback(stage_schedule=CACHED_SCHEDULE)]),
            **{name: PARTS[name](batches) for name in names[3:]}}
        order = names if run % 2 == 0 else names[::-1]
        steps = side_by_side({name: functools.partial(_fit_with, made[name][0], batches, made[name][1])
                              for name in order}, cpus=threads)
        for model, _ in made.values():
            if isinstance(model, PluginStudent):
                check_cache_read(model, batches)
        epochs = {name: [1000 * sum(t for e, t in times if e == epoch) for epoch in range(1, 6)]
                  for name, times in steps.items()}
        if run:
            for name, times in steps.items():
                epoch_ms[name].append(epochs[name])
                step_ms[name].append(1000 * median([t for e, t in times if e >= 1]))
            for name, key in keys.items():
                ratios[key].append(median(epochs[name]) / median(epochs["plain"]))
            print(f"  side by side {run}/{runs} (median ms per epoch): "
                  + ", ".join(f"{name} {median(values):.0f}" for name, values in epochs.items()), flush=True)
    raw = {"ratios_per_run": ratios, "median_ratios": {k: median(v) for k, v in ratios.items()},
           "ms_per_timed_epoch": epoch_ms, "median_ms_per_step": step_ms}
    return median(ratios["cached_distill_ratio"]), raw


def run_handwritten(batches: list) -> dict[str, list[float]]:
    return {"handwritten_kd": fit(HandwrittenKD(), batches, 3, [])[1:]}


def run_teacher_alone(batches: list) -> dict[str, list[float]]:
    teacher = make_teacher()
    gc.collect()
    seconds = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            for x, _, _ in batches:
                teacher(x)
            seconds.append(time.perf_counter() - start)
    return {"teacher": seconds[1:]}


def run_stage_switches(batches: list, epochs: int) -> list[float]:
    """Microseconds of each epoch-start stage application, in a fit whose stage changes every epoch."""
    schedule = [
        {"name": f"{'distill' if e % 2 == 0 else 'finetune'}_{e}", "start_epoch": e, "end_epoch": e + 1,
         "distillation": e % 2 == 0}
        for e in range(epochs)
    ]
    callback = TimedStageCallback(stage_schedule=schedule)  # verbose: the stage line is formatted and logged
    fit(PluginStudent(), batches[:1], epochs, [callback])
    return [ns / 1000 for ns in callback.nanoseconds[1:]]  # epoch 0 was applied already at on_train_start


# issue 11: the same weights-only schedule (no teacher) in epochs, in optimizer steps, and with a ramp over epochs 1-4
def _weights_only(unit: str, batches: int, ramp: bool = False) -> list[dict[str, Any]]:
    scale = batches if unit == "step" else 1
    second: dict[str, Any] = {"name": "b", f"start_{unit}": scale * (1 if ramp else 3), "loss_weights": {"cls": 0.5}}
    if ramp:
        second["ramp_epochs"] = 4
    return [{"name": "a", f"start_{unit}": 0, f"end_{unit}": second[f"start_{unit}"]}, second]


def run_units(batches: list) -> dict[str, list[float]]:
    """The weights-only schedule in epochs and in steps: epochs 1-5 of each are timed."""
    out = {}
    for unit, key in (("epoch", "epochs_unit"), ("step", "steps_unit")):
        callback = StageScheduleCallback(stage_schedule=_weights_only(unit, len(batches)))
        out[key] = fit(PluginStudent(), batches, 6, [callback])[1:]
    return out


def run_ramp(batches: list) -> dict[str, list[float]]:
    """The weights-only schedule in epochs with a ramp through epochs 1-4 (timed)."""
    callback = StageScheduleCallback(stage_schedule=_weights_only("epoch", len(batches), ramp=True))
    return {"ramp": fit(PluginStudent(), batches, 6, [callback])[1:5]}


class TimedBatchCallback(StageScheduleCallback):
    """The real callback, timing each ``on_train_batch_start``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nanoseconds: list[tuple[int, int]] = []  # (epoch, ns)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        start = time.perf_counter_ns()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.nanoseconds.append((trainer.current_epoch, time.perf_counter_ns() - start))


def run_batch_hooks(batches: list) -> dict[str, float]:
    """Median microseconds of one real ``on_train_batch_start`` in a fit: a step schedule (epochs 1-5: between
    boundaries, one comparison), and an epoch ramp (epochs 1-4: resolve and write the values before every batch).
    Unlike the epoch ratios, this is hardly moved by other processes on the machine."""
    out = {}
    for key, unit, ramp in (("step_hook_us", "step", False), ("ramp_hook_us", "epoch", True)):
        callback = TimedBatchCallback(stage_schedule=_weights_only(unit, len(batches), ramp=ramp), verbose=False)
        fit(PluginStudent(), batches, 6, [callback])
        out[key] = median([ns / 1000 for epoch, ns in callback.nanoseconds if 1 <= epoch <= (4 if ramp else 5)])
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "lightning": pl.__version__,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        # the vector instructions torch's kernels use here (e.g. AVX2, AVX512): small kernels' costs differ by them
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    with contextlib.suppress(OSError):
        info["load_average_before"] = os.getloadavg()
    return info


def write_large_config(path: str, megabytes: float = 49.0) -> None:
    """A config in the seed's format with a small schedule and a large section the schedule ignores (a dataset's file
    list, as configs carry them), about ``megabytes`` MB of plain JSON."""
    stages = [{"name": "distill", "start_epoch": 0, "end_epoch": 3, "distillation": True, "lambda_coef": 1.0,
               "loss_weights": {"bce": 0.0}}, {"name": "finetune", "start_epoch": 3, "distillation": False}]
    record = {"path": "/data/train/images/sample_{:09d}.png", "label": 3, "weight": 0.5, "split": "train"}
    one = len(json.dumps(record)) + 2
    files = [{**record, "path": record["path"].format(i)} for i in range(int(megabytes * 1e6 / one))]
    with open(path, "w") as handle:
        json.dump({"train": {"epochs": 6, "loss_weights": {"bce": 1.0}}, "stage_schedule": stages,
                   "dataset": {"files": files}}, handle)


def run_large_config(repetitions: int) -> tuple[float, dict[str, Any]]:
    """``large_config_ratio``: validating a 49 MB JSON config against ``json.loads`` of it, paired per repetition."""
    from lightning_stages.cli.lightning_config import schedule_of_config

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "large.json")
        write_large_config(path)
        size = os.path.getsize(path)
        loads, validate = [], []
        for _ in range(repetitions + 1):  # the first is a warm-up (file cache)
            gc.collect()
            start = time.perf_counter()
            with open(path, encoding="utf-8") as handle:
                json.loads(handle.read())
            loads.append(time.perf_counter() - start)
            gc.collect()
            start = time.perf_counter()
            schedule_of_config(path)
            validate.append(time.perf_counter() - start)
    ratios = [v / j for j, v in zip(loads[1:], validate[1:])]
    return median(ratios), {"bytes": size, "json_loads_s": loads[1:], "validate_s": validate[1:], "ratios": ratios}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and batches (5 repetitions)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: two threads on a shared 2-core machine turn every "
                        "other process into 10x slowdowns of whole epochs)")
    parser.add_argument("--only", choices=ONLY, help="run this one benchmark (the other epoch ratios come only "
                        "together, from a full run)")
    parser.add_argument("--parts", action="store_true", help="with --only cached_distill_ratio: also run, in the same "
                        "turns, the losses without the plugin, the cache's read alone and the cached fit without the "
                        "input check, each with its ratio to the plain fit")
    args = parser.parse_args(argv)
    if args.parts and args.only != "cached_distill_ratio":
        parser.error("--parts goes with --only cached_distill_ratio")
    settings = {**SETTINGS["quick" if args.quick else "full"], "threads": args.threads}
    torch.set_num_threads(args.threads)
    quiet()
    info = machine()
    load = info.get("load_average_before", (0.0,))[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the start: other processes share the CPUs and the timings "
              "will be noisy; run again on a quiet machine", flush=True)
    if args.only is not None:
        return run_only(args.only, args.quick, settings, info, args.json, args.parts)
    batches = make_batches(settings["batches"], settings["batch_size"])
    student_params, teacher_params = count(make_student()), count(make_teacher())
    print(f"student {student_params / 1e6:.2f}M parameters, teacher {teacher_params / 1e6:.2f}M "
          f"({teacher_params / student_params:.1f}x); {settings['batches']} batches of {settings['batch_size']} "
          f"per epoch; {settings['repetitions']} repetitions after a warm-up; torch threads "
          f"{torch.get_num_threads()}; {info['cpu']} ({info['cpu_capability']})", flush=True)

    variants: list[tuple[str, Callable[[], dict[str, list[float]]]]] = [
        ("plain", lambda: run_plain(batches)),
        ("plugin", lambda: run_plugin(batches)),
        ("teacher", lambda: run_teacher_alone(batches)),
        ("cached", lambda: run_cached(batches)),
        ("handwritten", lambda: run_handwritten(batches)),
        ("units", lambda: run_units(batches)),
        ("ramp", lambda: run_ramp(batches)),
    ]
    with tempfile.TemporaryDirectory() as tmp:  # warm-up repetition, also writes the two checkpoints
        plain_ckpt, plugin_ckpt = os.path.join(tmp, "plain.ckpt"), os.path.join(tmp, "plugin.ckpt")
        run_plain(batches, plain_ckpt)
        run_plugin(batches, plugin_ckpt)
        run_teacher_alone(batches)
        run_cached(batches)
        run_handwritten(batches)
        run_units(batches)
        run_ramp(batches)
        plain_bytes, plugin_bytes = os.path.getsize(plain_ckpt), os.path.getsize(plugin_ckpt)
    epochs: dict[str, list[list[float]]] = {}  # measurement -> per repetition, the timed epochs' seconds
    for repetition in range(settings["repetitions"]):
        order = variants if repetition % 2 == 0 else variants[::-1]
        for _, run in order:
            for key, seconds in run().items():
                epochs.setdefault(key, []).append(seconds)
        ms = {key: median(values[-1]) * 1000 for key, values in epochs.items()}
        print(f"  repetition {repetition + 1}/{settings['repetitions']} (median ms per epoch): "
              + ", ".join(f"{key} {value:.0f}" for key, value in ms.items()), flush=True)
    switches_us = run_stage_switches(batches, settings["switch_epochs"])
    large_config_ratio, large_config = run_large_config(3 if args.quick else 5)
    hooks_us = run_batch_hooks(batches)
    cached_ratio, side = cached_side_by_side(batches, settings["side_by_side_runs"], args.threads)

    # per repetition, each measurement is the median of its timed epochs
    rep = {key: [median(seconds) for seconds in values] for key, values in epochs.items()}
    # each ratio: the median over repetitions of the ratio within a repetition (variants timed one after the other)
    per_repetition = {
        "off_stage_ratio": [b / a for a, b in zip(rep["plain"], rep["plugin_finetune"])],
        "distill_stage_ratio": [d / (a + t) for a, t, d in zip(rep["plain"], rep["teacher"], rep["plugin_distill"])],
        # cached_distill_ratio's protocol before the fifteenth session (separate fits; now side by side, above)
        "cached_separate_fits_ratio": [c / a for a, c in zip(rep["plain"], rep["cached"])],
        # the protocol before the eleventh session: the mean of the cached epochs 1-2 only, for comparison
        "cached_first_two_ratio": [median(c[:2]) / a for a, c in zip(rep["plain"], epochs["cached"])],
        "plugin_vs_handwritten_kd": [d / h for h, d in zip(rep["handwritten_kd"], rep["plugin_distill"])],
        "handwritten_kd_vs_separate": [h / (a + t) for a, t, h in zip(rep["plain"], rep["teacher"],
                                                                       rep["handwritten_kd"])],
        "step_schedule_ratio": [b / a for a, b in zip(rep["epochs_unit"], rep["steps_unit"])],
        # the ramp's epochs 1-4 against the same epochs (1-4) of the epoch-unit schedule
        "ramp_ratio": [median(r) / median(e[:4]) for e, r in zip(epochs["epochs_unit"], epochs["ramp"])],
    }
    results: dict[str, Any] = {
        "off_stage_ratio": median(per_repetition["off_stage_ratio"]),
        "distill_stage_ratio": median(per_repetition["distill_stage_ratio"]),
        "cached_distill_ratio": cached_ratio,
        "checkpoint_size_ratio": plugin_bytes / plain_bytes,
        "stage_switch_us": median(switches_us),
        "large_config_ratio": large_config_ratio,
        "step_schedule_ratio": median(per_repetition["step_schedule_ratio"]),
        "ramp_ratio": median(per_repetition["ramp_ratio"]),
    }
    results["compare_throughput_ratio"], compare_raw = compare_throughput_ratio(args.quick)
    steps = settings["batches"]
    results["raw"] = {
        "seconds_per_timed_epoch": epochs,
        "ratios_per_repetition": per_repetition,
        "median_ratios": {k: median(v) for k, v in per_repetition.items()},
        "median_ms_per_step": {k: median(v) / steps * 1000 for k, v in rep.items()},
        "stage_switch_us": switches_us,
        "large_config": large_config,
        "batch_hook_us": hooks_us,
        "cached_side_by_side": side,
        "compare_throughput": compare_raw,
        "checkpoint_bytes": {"plain": plain_bytes, "plugin": plugin_bytes},
        "parameters": {"student": student_params, "teacher": teacher_params},
        "settings": {**settings, "quick": args.quick},
        "machine": {**info, "load_average_after": os.getloadavg()},
    }
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")
    return results


ONLY = ("cached_distill_ratio", "compare_throughput_ratio", "large_config_ratio", "stage_switch_us")


def run_only(name: str, quick: bool, settings: dict[str, Any], info: dict[str, Any], json_path: str | None,
             parts: bool = False) -> dict[str, Any]:
    """One benchmark alone (``--only NAME``): print its row and, with ``--json``, write it with its raw timings."""
    raw: Any
    if name == "compare_throughput_ratio":
        value, raw = compare_throughput_ratio(quick)
    elif name == "large_config_ratio":
        value, raw = run_large_config(3 if quick else 5)
    elif name == "cached_distill_ratio":
        batches = make_batches(settings["batches"], settings["batch_size"])
        value, raw = cached_side_by_side(batches, settings["side_by_side_runs"], settings["threads"], parts)
    else:
        raw = run_stage_switches(make_batches(settings["batches"], settings["batch_size"]), settings["switch_epochs"])
        value = median(raw)
    results = {name: value, "raw": {name: raw, "settings": {**settings, "quick": quick},
                                    "machine": {**info, "load_average_after": os.getloadavg()}}}
    print_row(name, value, header=True)
    if name == "cached_distill_ratio":
        print(f"control (a second plain fit side by side) / plain = {raw['median_ratios']['control_ratio']:.3f}")
        for part in PARTS if parts else ():
            print(f"{part} / plain = {raw['median_ratios'][part + '_ratio']:.3f}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {json_path}")
    return results


def print_row(key: str, value: float, header: bool = False) -> None:
    if header:
        print(f"| {'metric':<24} | {'value':>9} | {'target':>8} | met |")
        print(f"|{'-' * 26}|{'-' * 11}|{'-' * 10}|-----|")
    op, target = TARGETS[key]
    met = {"<=": value <= target, "<": value < target, ">=": value >= target}[op]
    shown = f"{value:.1f}" if key == "stage_switch_us" else f"{value:.3f}"
    print(f"| {key:<24} | {shown:>9} | {op + ' ' + format(target, 'g'):>8} | {'yes' if met else 'NO':<3} |")


def print_table(results: dict[str, Any]) -> None:
    per_step = results["raw"]["median_ms_per_step"]
    print()
    print("median ms per training step: " + ", ".join(f"{k} {v:.2f}" for k, v in per_step.items()))
    ratios = results["raw"]["median_ratios"]
    print(f"references: plugin distill epoch / hand-written KD epoch = {ratios['plugin_vs_handwritten_kd']:.3f}; "
          f"hand-written KD epoch / (plain epoch + teacher pass) = {ratios['handwritten_kd_vs_separate']:.3f}")
    side = results["raw"]["cached_side_by_side"]["median_ratios"]
    print(f"side by side: cached / plain epoch = {side['cached_distill_ratio']:.3f}, control (a second plain fit) / "
          f"plain = {side['control_ratio']:.3f}; separate fits (before the fifteenth session) = "
          f"{ratios['cached_separate_fits_ratio']:.3f}")
    hooks = results["raw"]["batch_hook_us"]
    print(f"on_train_batch_start, median us: step schedule between boundaries {hooks['step_hook_us']:.1f}, "
          f"during an epoch ramp {hooks['ramp_hook_us']:.1f}")
    print()
    for i, key in enumerate(TARGETS):
        print_row(key, results[key], header=i == 0)


def quiet() -> None:
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|smaller than the logging interval).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # keep the plugin's per-epoch stage line (its cost is part of stage_switch_us), but write it to memory
    stage_logger = logging.getLogger("lightning_stages")
    stage_logger.handlers = [logging.StreamHandler(io.StringIO())]
    stage_logger.propagate = False


if __name__ == "__main__":
    main(sys.argv[1:])
