"""``lightning-stages compare``: train each ``LightningCLI`` config over the same seeds and report which is better.

Each run goes through :class:`~lightning_stages.cli.stages_lightning_cli.StagesLightningCLI`; the report
(:mod:`lightning_stages.cli.compare_report`) names a winner only where the seeds allow an answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_stages.cli.compare_report import RunOutcome, plot_curves, write_report
from lightning_stages.cli.lightning_config import (
    add_working_directory_to_path,
    like_for_like_differences,
    schedule_of_config,
)
from lightning_stages.cli.stages_lightning_cli import StagesLightningCLI
from lightning_stages.errors import StageConfigError
from lightning_stages.schedule.render import format_summary
from lightning_stages.stage_schedule_callback import StageScheduleCallback

__all__ = ["CompareResult", "run_compare"]


class _CurveRecorder(Callback):
    """Records a validation metric after each validation run (not the sanity check)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.points: list[tuple[int, float]] = []

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            self.points.append((trainer.current_epoch, float(value)))


@dataclass
class CompareResult:
    """What ``compare`` produced: the report, the curves, the TensorBoard runs and every run's outcome.

    Attributes:
        report: path of ``report.md``.
        curves: path of ``curves.png`` (``None`` without matplotlib).
        tensorboard: the directory of the TensorBoard runs.
        runs: ``{schedule: [per-seed outcome]}``, each with ``metrics``, ``curve``, ``seconds`` and ``error``.
        warnings: the like-for-like warnings.

    Example::

        >>> CompareResult(Path("report.md"), None, Path("tb"), {"a": [RunOutcome("a", 0, error="boom")]}, []).failed
        True
    """

    report: Path
    curves: Optional[Path]
    tensorboard: Path
    runs: dict[str, list[RunOutcome]]
    warnings: list[str]

    @property
    def failed(self) -> bool:
        """Whether any run failed."""
        return any(run.error is not None for runs in self.runs.values() for run in runs)

    def locations(self) -> list[str]:
        """The lines that tell the user where the report, the curves and the TensorBoard runs are.

        Example::

            >>> CompareResult(Path("out/report.md"), None, Path("out/tb"), {}, []).locations()
            ['report: out/report.md', 'tensorboard --logdir out/tb']
        """
        lines = [f"report: {self.report}"]
        if self.curves is not None:
            lines.append(f"curves: {self.curves}")
        lines.append(f"tensorboard --logdir {self.tensorboard}")
        return lines


def _schedule_names(configs: Sequence[Union[str, os.PathLike]]) -> list[str]:
    stems = [Path(c).stem for c in configs]
    prefix = os.path.commonprefix(stems) if len(stems) > 1 else ""  # noqa: RUF071 - a common prefix of names, not paths
    prefix = prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""
    names = [s[len(prefix):] or s for s in stems]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


@contextlib.contextmanager
def _quiet() -> Any:
    """Keep Lightning's and our per-epoch INFO lines and known noise out of compare's one-line-per-run output."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning_stages")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in (".*does not have many workers.*", ".*litlogger.*", ".*DiceScore metric currently defaults.*",
                        ".*LightningCLI's args parameter.*", ".*Checkpoint directory.*exists and is not empty.*",
                        ".*treespec.*", ".*smaller than the logging interval.*"):
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _one_run(config: Path, name: str, seed: int, out: Path, curve_metric: str, metrics: Sequence[str],
             stages: Optional[str]) -> tuple[RunOutcome, list[tuple[int, str]]]:
    run = RunOutcome(name, seed)
    boundaries: list[tuple[int, str]] = []
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(out / "tb"), "name": name, "version": f"seed_{seed}"}}
    args = ["--config", str(config), f"--seed_everything={seed}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger={json.dumps(logger)}",
            f"--trainer.default_root_dir={out / 'tb' / name / f'seed_{seed}'}"]
    if stages is not None:
        args.append(f"--stages={stages}")
    start = time.perf_counter()
    try:
        with _quiet():
            cli = StagesLightningCLI(args=args, run=False, parser_kwargs={"exit_on_error": False},
                                     save_config_kwargs={"overwrite": True})
            recorder = _CurveRecorder(curve_metric)
            cli.trainer.callbacks.append(recorder)  # type: ignore[attr-defined]  # set by Lightning's callback connector, not declared
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        logged = results[0] if results else {}
        missing = [m for m in metrics if m not in logged]
        if missing:
            raise KeyError(f"the test step logged no {', '.join(missing)} (logged: {', '.join(logged) or 'nothing'})")
        run.metrics = {m: float(logged[m]) for m in metrics}
        run.curve = list(recorder.points)
        for callback in cli.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, StageScheduleCallback) and callback.resolved_schedule is not None:
                boundaries = [(r.start_epoch, r.name) for r in callback.resolved_schedule.timeline()]
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        run.error = f"{type(err).__name__}: {err}".strip()
        logging.getLogger(__name__).debug("run %s seed %s failed", name, seed, exc_info=True)
        if os.environ.get("LIGHTNING_STAGES_DEBUG"):
            traceback.print_exc()
    run.seconds = time.perf_counter() - start
    return run, boundaries


def run_compare(
    configs: Sequence[Union[str, os.PathLike]],
    seeds: Union[int, Sequence[int]] = 3,
    out: Union[str, os.PathLike] = "runs/compare",
    metrics: Sequence[str] = ("test/iou", "test/dice", "test/acc"),
    curve_metric: str = "val/iou",
    stages: Optional[Sequence[Optional[str]]] = None,
    reference: Optional[Mapping[str, Mapping[str, float]]] = None,
    echo: Any = print,
) -> CompareResult:
    """Train every LightningCLI config with the same seeds and write ``report.md``, ``curves.png`` and ``tb/``.

    Each run is ``fit`` then ``test`` of the config through :class:`StagesLightningCLI`, with the seed set by
    ``seed_everything``, a TensorBoard logger under ``out/tb/<schedule>/seed_<n>``, and no progress bar. A run
    that fails is recorded with its error and the others go on. One line per finished run goes to ``echo``.

    Args:
        configs: LightningCLI YAML files, one per schedule; the schedule is named after the file.
        seeds: how many seeds (``0..n-1``) or the seeds themselves.
        out: the output directory.
        metrics: test metrics for the table, the first being the primary one for the verdict.
        curve_metric: validation metric drawn per epoch in ``curves.png``.
        stages: optional ``--stages`` schedule file per config (``None`` entries for none).
        reference: extra rows for the table, e.g. ``{"teacher": {"test/iou": 0.9}}``.
        echo: where progress lines go.

    Example::

        >>> run_compare([], seeds=1, out="unused")
        Traceback (most recent call last):
        ...
        ValueError: compare needs at least one config
    """
    if not configs:
        raise ValueError("compare needs at least one config")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    add_working_directory_to_path()
    paths = [Path(c) for c in configs]
    names = _schedule_names(paths)
    stage_files = list(stages) if stages is not None else [None] * len(paths)
    differences = like_for_like_differences(paths)
    for difference in differences:
        warnings.warn(f"compare: not like for like: {difference}", UserWarning, stacklevel=2)
    summaries: dict[str, str] = {}
    for name, path, stage_file in zip(names, paths, stage_files):
        try:
            summaries[name] = format_summary(schedule_of_config(path, stages=stage_file))
        except StageConfigError as err:
            summaries[name] = "invalid: " + str(err).replace("\n", " ")
    runs: dict[str, list[RunOutcome]] = {name: [] for name in names}
    boundaries: dict[str, list[tuple[int, str]]] = {}
    total, done = len(paths) * len(seed_list), 0
    for seed in seed_list:
        for name, path, stage_file in zip(names, paths, stage_files):
            run, bounds = _one_run(path, name, seed, out, curve_metric, metrics, stage_file)
            runs[name].append(run)
            if bounds:
                boundaries[name] = bounds
            done += 1
            if run.error is None:
                scores = "  ".join(f"{m}={v:.3f}" for m, v in run.metrics.items())
                echo(f"[{done}/{total}] {name} seed {seed}: {scores}  ({run.seconds:.1f} s)")
            else:
                echo(f"[{done}/{total}] {name} seed {seed}: FAILED: {run.error.splitlines()[0]}  ({run.seconds:.1f} s)")
    curves = plot_curves(runs, boundaries, curve_metric, out / "curves.png")
    report = write_report(runs, dict(zip(names, paths)), seed_list, metrics, summaries, differences, reference, out,
                          curves)
    return CompareResult(report=report, curves=curves, tensorboard=out / "tb", runs=runs, warnings=differences)
