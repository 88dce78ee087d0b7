"""One training run of ``compare``: ``fit`` then ``test`` of a config with one seed, in a fresh run folder.

:func:`execute_run` is what every launcher calls (in this process, in a worker process or as a Ray task). It empties
the run folder ``OUT/runs/<schedule>/seed_<n>/`` first, so a rerun never mixes TensorBoard event files or
checkpoints with an earlier run, and returns a :class:`~lightning_stages.cli.compare_report.RunOutcome` with the
test metrics, the validation curves, the wall time split into distilling and other epochs and the teacher forwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_stages.cli.compare_report import RunOutcome
from lightning_stages.cli.lightning_config import add_working_directory_to_path

__all__ = ["RunSpec", "execute_run"]

_NOISE = (".*does not have many workers.*", ".*litlogger.*", ".*DiceScore metric currently defaults.*",
          ".*LightningCLI's args parameter.*", ".*treespec.*", ".*smaller than the logging interval.*")


@dataclass(frozen=True)
class RunSpec:
    """What one run needs; plain data, so that it pickles to a worker process or a Ray task.

    Attributes:
        schedule: the schedule's name (its folder under ``runs/``).
        seed: the seed, given to ``seed_everything``.
        config: the LightningCLI YAML.
        stages: an optional ``--stages`` schedule file.
        run_dir: the run folder, ``OUT/runs/<schedule>/seed_<n>``; emptied before the run.
        metrics: the test metrics the run must log.
        threads: torch intra-op threads for the run (``None``: leave as is).
        workdir: the working directory to train in (a Ray task: the driver's), ``None`` for this process's.

    Example::

        >>> RunSpec("joint", 0, "joint.yaml", None, "out/runs/joint/seed_0", ("test/iou",)).seed
        0
    """

    schedule: str
    seed: int
    config: str
    stages: Optional[str]
    run_dir: str
    metrics: tuple[str, ...]
    threads: Optional[int] = None
    workdir: Optional[str] = None


class _CurveRecorder(Callback):
    """Records every ``val*`` metric after each validation run (not the sanity check)."""

    def __init__(self) -> None:
        self.curves: dict[str, list[tuple[int, float]]] = {}

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val") and value.numel() == 1:
                self.curves.setdefault(name, []).append((trainer.current_epoch, float(value)))


class _CostMeter(Callback):
    """Wall time of distilling and other training epochs, and the teachers' forwards while training.

    An epoch counts as distilling when distillation was on at any of its training batches. Each teacher gets a
    forward pre-hook (once, when first seen) that counts its forwards and their samples while the trainer trains.
    """

    def __init__(self) -> None:
        self.distill_seconds = 0.0
        self.other_seconds = 0.0
        self.teacher_forwards = 0
        self.teacher_samples = 0
        self._epoch_start = 0.0
        self._distilling = False
        self._hooked: set[int] = set()
        self._handles: list[Any] = []
        self._trainer: Optional[pl.Trainer] = None

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        if self._trainer is not None and self._trainer.training:
            self.teacher_forwards += 1
            first = args[0] if args else None
            self.teacher_samples += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._epoch_start = time.perf_counter()
        self._distilling = False

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if getattr(pl_module, "use_distillation", False):
            self._distilling = True
        for teacher in getattr(pl_module, "teachers", {}).values():
            if id(teacher) not in self._hooked:
                self._hooked.add(id(teacher))
                self._handles.append(teacher.register_forward_pre_hook(self._count))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._epoch_start
        if self._distilling:
            self.distill_seconds += seconds
        else:
            self.other_seconds += seconds

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for handle in self._handles:
                handle.remove()
            self._handles.clear()


@contextlib.contextmanager
def _quiet() -> Any:
    """Keep Lightning's and our per-epoch INFO lines and known noise out of compare's one-line-per-run output."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning_stages")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]) -> Any:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _own_seed_state() -> Any:
    """Leave the caller's random states and ``PL_*`` seed variables as they were (``seed_everything`` sets both).

    A run in the ``compare`` process must not leak its seed: Lightning reads ``PL_GLOBAL_SEED`` for the
    ``DistributedSampler`` of any later fit, in this process or in a subprocess that inherits the environment.
    """
    saved_env = {key: os.environ.get(key) for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    saved_random, saved_numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(saved_random)
        np.random.set_state(saved_numpy)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _fit_and_test(spec: RunSpec, run: RunOutcome) -> None:
    from lightning_stages.cli.stages_lightning_cli import StagesLightningCLI
    from lightning_stages.stage_schedule_callback import StageScheduleCallback

    run_dir = Path(spec.run_dir)
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(run_dir.parent.parent), "name": run_dir.parent.name,
                            "version": run_dir.name}}
    args = ["--config", spec.config, f"--seed_everything={spec.seed}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger={json.dumps(logger)}",
            f"--trainer.default_root_dir={run_dir}"]
    if spec.stages is not None:
        args.append(f"--stages={spec.stages}")
    cli = StagesLightningCLI(args=args, run=False, parser_kwargs={"exit_on_error": False})
    recorder, meter = _CurveRecorder(), _CostMeter()
    callbacks: list[Any] = cli.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning, not declared
    callbacks.extend([recorder, meter])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    logged = results[0] if results else {}
    run.metrics = {m: float(v) for m, v in logged.items()}
    run.curves = dict(recorder.curves)
    run.distill_seconds, run.other_seconds = meter.distill_seconds, meter.other_seconds
    run.teacher_forwards, run.teacher_samples = meter.teacher_forwards, meter.teacher_samples
    for callback in callbacks:
        if isinstance(callback, StageScheduleCallback) and callback.resolved_schedule is not None:
            run.boundaries = [(r.start_epoch, r.name) for r in callback.resolved_schedule.timeline()]
    run.check_metrics(spec.metrics)  # failed, but kept with what it logged: the right --metrics reuses it


@contextlib.contextmanager
def _own_sigint() -> Any:
    """Put back the Ctrl-C handler after the run: Lightning ignores Ctrl-C from the first one on (``SIG_IGN``)."""
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


def _interrupted(err: BaseException) -> bool:
    """Whether ``err`` is Ctrl-C: a ``KeyboardInterrupt``, or the ``sys.exit(1)`` Lightning turns one into in fit/test."""
    return isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit)
                                                  and isinstance(err.__context__, KeyboardInterrupt))


def execute_run(spec: RunSpec, *, stop_on_sigterm: bool = False) -> RunOutcome:
    """Train and test one (schedule, seed) in an emptied run folder; a failure is recorded, not raised (a
    ``sys.exit`` in the run's code too: that run failed).

    Ctrl-C is raised, not recorded: a ``KeyboardInterrupt``, also when Lightning has turned it into ``sys.exit(1)``
    (raised as ``KeyboardInterrupt`` then). With ``stop_on_sigterm`` (a run in the ``compare`` process itself), the
    ``SIGTERMException`` Lightning raises on SIGTERM is raised too, so that the comparison stops.

    Example::

        >>> import tempfile, pathlib
        >>> run_dir = pathlib.Path(tempfile.mkdtemp()) / "runs" / "a" / "seed_0"
        >>> outcome = execute_run(RunSpec("a", 0, str(run_dir / "missing.yaml"), None, str(run_dir), ("test/iou",)))
        >>> outcome.error.split(":")[0], run_dir.is_dir()
        ('ArgumentError', True)
    """
    if spec.workdir is not None and os.path.isdir(spec.workdir):
        os.chdir(spec.workdir)
    add_working_directory_to_path()
    run_dir = Path(spec.run_dir)
    if run_dir.parent.is_file():  # a file where compare's folder of the schedule goes
        run_dir.parent.unlink()
    if run_dir.is_symlink() or run_dir.is_file():  # a link or file where the run's folder goes: never its target
        run_dir.unlink()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    run = RunOutcome(spec.schedule, spec.seed)
    start = time.perf_counter()
    try:
        with _own_sigint(), _quiet(), _torch_threads(spec.threads), _own_seed_state():
            _fit_and_test(spec, run)
    except BaseException as err:
        if _interrupted(err):
            if isinstance(err, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from err
        if stop_on_sigterm and isinstance(err, SIGTERMException):
            raise
        run.error = f"{type(err).__name__}: {err}".strip()
        logging.getLogger(__name__).debug("run %s seed %s failed", spec.schedule, spec.seed, exc_info=True)
        if os.environ.get("LIGHTNING_STAGES_DEBUG"):
            traceback.print_exc()
    run.seconds = time.perf_counter() - start
    return run
