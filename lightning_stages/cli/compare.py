"""``lightning-stages compare``: train each ``LightningCLI`` config over the same seeds and report which is better.

Each run goes through :func:`~lightning_stages.cli.training_run.execute_run` in its own folder
``OUT/runs/<schedule>/seed_<n>/``, launched by a :mod:`~lightning_stages.cli.launchers` launcher (this process, a pool
of worker processes, or Ray). Finished runs are kept (:mod:`~lightning_stages.cli.run_store`) and reused by a later
comparison of the same configs; one ``compare`` at a time writes into ``OUT`` (a lock file there). The report
(:mod:`~lightning_stages.cli.compare_report`) names a winner only where the paired analysis of the seeds
(:mod:`~lightning_stages.cli.stats`) allows an answer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

from tqdm.auto import tqdm

from lightning_stages.cli.compare_report import RunOutcome, metric_verdict, plot_curves, write_report
from lightning_stages.cli.launchers import LocalLauncher, RayLauncher, default_jobs
from lightning_stages.cli.lightning_config import add_working_directory_to_path, schedule_of_config
from lightning_stages.cli.like_for_like import like_for_like_differences
from lightning_stages.cli.run_edits import edit_fingerprint
from lightning_stages.cli.run_fingerprint import run_fingerprints
from lightning_stages.cli.run_store import (
    LOCK_FILE,
    OutputInUseError,
    adopt_fingerprint,
    finished_bytes,
    load_result,
    lock_out,
    record_result,
    replaced_runs,
    restore_result,
    run_dir,
    schedule_names,
    version_note,
)
from lightning_stages.cli.stats import require_scipy
from lightning_stages.cli.training_run import RunSpec
from lightning_stages.errors import StageConfigError, printable
from lightning_stages.schedule.render import format_summary
from lightning_stages.schedule.seed_format import load_config

__all__ = ["AUTO_START_SEEDS", "LOCK_FILE", "CompareResult", "OutputInUseError", "run_compare"]

_CHANGED = "ChangedDuringCompare: its config (or a config file it names) or the model's code changed while it ran"
#: ``--seeds auto`` starts with this many seeds (or ``max_seeds`` if fewer), then adds one per round
AUTO_START_SEEDS = 3
@dataclass
class CompareResult:
    """What ``compare`` produced: the report, the curves, the run folders and every run's outcome.

    Attributes:
        report: path of ``report.md``.
        curves: path of ``curves.png`` (``None`` without matplotlib).
        tensorboard: the folder of the runs (``OUT/runs``), each with its ``result.json`` and TensorBoard events.
        runs: ``{schedule: [per-seed outcome]}``; see :class:`RunOutcome`.
        warnings: the like-for-like warnings.
        seeds: the seeds of the comparison.
        decided: whether the primary metric's verdict names a winner.

    Example::

        >>> CompareResult(Path("report.md"), None, Path("runs"), {"a": [RunOutcome("a", 0, error="boom")]}, []).failed
        True
    """

    report: Path
    curves: Optional[Path]
    tensorboard: Path
    runs: dict[str, list[RunOutcome]]
    warnings: list[str]
    seeds: list[int] = field(default_factory=list)
    decided: bool = False

    @property
    def failed(self) -> bool:
        """Whether any run failed."""
        return any(run.error is not None for runs in self.runs.values() for run in runs)

    @property
    def trained(self) -> int:
        """How many runs trained in this comparison (the others were reused)."""
        return sum(not run.reused for runs in self.runs.values() for run in runs)

    def locations(self) -> list[str]:
        """The lines that tell the user where the report, the curves and the TensorBoard runs are.

        Example::

            >>> CompareResult(Path("out/report.md"), None, Path("out/runs"), {}, []).locations()
            ['report: out/report.md', 'tensorboard --logdir out/runs']
        """
        curves = [] if self.curves is None else [f"curves: {self.curves}"]
        return [f"report: {self.report}", *curves, f"tensorboard --logdir {self.tensorboard}"]


def _display_names(names: Sequence[str]) -> dict[str, str]:
    """Shorter names for the report and the progress lines: the prefix all names share (up to a ``_``) dropped.

    Display only: the run folders keep the full names.

    Example::

        >>> _display_names(["seg_distill", "seg_labels"])
        {'seg_distill': 'distill', 'seg_labels': 'labels'}
    """
    prefix = os.path.commonprefix(list(names)) if len(names) > 1 else ""  # noqa: RUF071 - names, not paths
    prefix = prefix[: prefix.rfind("_") + 1]
    shown = [n[len(prefix):] or n for n in names]
    return dict(zip(names, shown if len(set(shown)) == len(shown) else names))


def _check_readable(configs: Sequence[Union[str, os.PathLike]]) -> None:
    """Raise the :class:`StageConfigError` (naming the file) of the first config that is not a YAML/JSON mapping."""
    for config in configs:
        load_config(config)


def _seed_rounds(seeds: Union[int, str, Sequence[int]], max_seeds: int) -> tuple[list[int], bool]:
    """The first round's seeds and whether more rounds may follow (``"auto"``)."""
    if isinstance(seeds, str):
        if seeds != "auto":
            raise ValueError(f"seeds must be a number of seeds, a list of seeds or 'auto', got {seeds!r}")
        if max_seeds < 2:
            raise ValueError(f"--seeds auto needs --max-seeds of at least 2, got {max_seeds}")
        return list(range(min(AUTO_START_SEEDS, max_seeds))), True
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1 (or 'auto'), got {seeds}")
        return list(range(seeds)), False
    seed_list = [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {seed_list}")
    return seed_list, False


def _short(result: Any, shown: Mapping[str, str]) -> str:
    if result.winner is not None:
        return f"{shown[result.winner]} wins"
    return "undecided" if len(result.ranking) > 1 else "-"


def _line(run: RunOutcome, name: str, done: int, total: int, metrics: Sequence[str]) -> str:
    where = f"[{done}/{total}] {name} seed {run.seed}:"
    if run.error is not None:
        # its lines joined (a StageConfigError's first line only says how many problems), shortened
        error = printable(" ".join(line.strip() for line in run.error.splitlines()), 300)
        return f"{where} FAILED: {error}  ({run.seconds:.1f} s)"
    scores = "  ".join(f"{m}={run.metrics[m]:.3f}" for m in metrics if m in run.metrics)
    return f"{where} {scores}  ({run.seconds:.1f} s{', reused' if run.reused else ''})"


def run_compare(
    configs: Sequence[Union[str, os.PathLike]],
    seeds: Union[int, str, Sequence[int]] = 3,
    out: Union[str, os.PathLike] = "runs/compare",
    metrics: Sequence[str] = ("test/iou", "test/dice", "test/acc"),
    curve_metric: str = "val/iou",
    stages: Optional[Sequence[Optional[str]]] = None,
    reference: Optional[Mapping[str, Mapping[str, float]]] = None,
    echo: Any = print,
    *,
    max_seeds: int = 10,
    jobs: Optional[int] = None,
    launcher: str = "local",
    ray_num_cpus: float = 1.0,
    ray_num_gpus: float = 0.0,
    fresh: bool = False,
    progress: Optional[bool] = None,
) -> CompareResult:
    """Train every LightningCLI config with the same seeds and write ``report.md``, ``curves.png`` and ``runs/``.

    Each run is ``fit`` then ``test`` of the config through :class:`StagesLightningCLI`, with the seed set by
    ``seed_everything``, a TensorBoard logger in its own emptied folder ``out/runs/<schedule>/seed_<n>``, and no
    progress bar. A finished run writes ``result.json`` there with its config's fingerprint; a later comparison into
    the same ``out`` reuses it when the fingerprint matches (``fresh=True``: never). A run that fails is recorded
    with its error and the others go on. One line per finished run goes to ``echo``; one progress bar (on a
    terminal) shows the runs done, the current verdict and the ETA.

    Args:
        configs: LightningCLI YAML files, one per schedule; the schedule and its run folder are named after the
            file (its name without suffix; configs with the same file name are told apart by their folder). The
            report and the progress lines show the names without the prefix they all share (``seg_``).
        seeds: how many seeds (``0..n-1``), the seeds themselves, or ``"auto"``: start with 3 seeds and add one
            per round until the primary metric's verdict names a winner or ``max_seeds`` is reached.
        out: the output directory.
        metrics: test metrics for the table, the first being the primary one for the verdict.
        curve_metric: validation metric drawn per epoch in ``curves.png``.
        stages: optional ``--stages`` schedule file per config (``None`` entries for none).
        reference: extra rows for the table, e.g. ``{"teacher": {"test/iou": 0.9}}``.
        echo: where progress lines go.
        max_seeds: the most seeds ``seeds="auto"`` may use.
        jobs: runs at once on this machine, each in its own process (default: one per 2 cores; 1 trains in this
            process). Only for ``launcher="local"``.
        launcher: ``"local"`` or ``"ray"`` (each run a Ray task; ``RAY_ADDRESS`` or a local Ray).
        ray_num_cpus: CPUs per run for Ray (also its torch threads).
        ray_num_gpus: GPUs per run for Ray.
        fresh: train every run again, ignoring finished results in ``out``.
        progress: show the progress bar (``None``: only on a terminal).

    Raises:
        ValueError: no config, bad ``seeds``/``max_seeds``/``jobs``/``launcher``.
        ImportError: scipy (or Ray for ``launcher="ray"``) is not installed; the message says how to get it.
        StageConfigError: a config (or ``stages`` file) is missing or not a YAML/JSON mapping; the message names
            the file. Nothing was trained.
        OutputInUseError: another ``compare`` is writing into ``out``, or ``out`` holds a ``report.md`` or
            ``curves.png`` that no ``compare`` wrote. Nothing was trained.
        KeyboardInterrupt: Ctrl-C (also in a run that trains in this process): the comparison stops; finished runs
            are kept, the runs in flight are lost and no report is written.

    Example::

        >>> run_compare(["a.yaml"], seeds=0, out="unused")
        Traceback (most recent call last):
        ...
        ValueError: --seeds must be at least 1 (or 'auto'), got 0
    """
    if not configs:
        raise ValueError("compare needs at least one config")
    seed_list, auto = _seed_rounds(seeds, max_seeds)
    if launcher not in ("local", "ray"):
        raise ValueError(f"launcher must be 'local' or 'ray', got {launcher!r}")
    if jobs is not None and (launcher != "local" or jobs < 1):
        raise ValueError(f"jobs must be at least 1, got {jobs}" if launcher == "local" else
                         "jobs is for the local launcher; with Ray, ray_num_cpus per run decides how many run at once")
    require_scipy()
    _check_readable([*configs, *(s for s in stages or [] if s)])
    out = Path(out).resolve()
    theirs = [name for name in ("report.md", "curves.png") if (out / name).exists()]
    if theirs and not (out / LOCK_FILE).exists():  # files of the user's, not of an earlier compare: never overwritten
        raise OutputInUseError(f"{out} holds {' and '.join(theirs)} that compare did not write (no {LOCK_FILE}); give "
                               "another --out, or move them")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way, no permission, a read-only or virtual file system (/proc)
        raise OutputInUseError(f"--out {out} cannot be made a folder: {err.strerror or err}") from None
    with lock_out(out):
        add_working_directory_to_path()
        paths = [Path(c).resolve() for c in configs]
        names = schedule_names(configs)
        shown = _display_names(names)
        stage_files = ([str(Path(s).resolve()) if s else None for s in stages] if stages is not None
                       else [None] * len(paths))
        differences = like_for_like_differences(paths)
        for difference in differences:
            warnings.warn(f"compare: not like for like: {difference}", UserWarning, stacklevel=2)
        summaries: dict[str, str] = {}
        sources = {name: (path, stage_file) for name, path, stage_file in zip(names, paths, stage_files)}
        for name, (path, stage_file) in sources.items():
            try:
                summaries[shown[name]] = format_summary(schedule_of_config(path, stages=stage_file))
            except StageConfigError as err:
                summaries[shown[name]] = "invalid: " + str(err).replace("\n", " ")
        # accepted: the current fingerprint first, then those of results an earlier version saved before the model's
        # code (or the modules it imports) counted, reused when the rest matches
        accepted = {name: run_fingerprints(*source) for name, source in sources.items()}
        fingerprints = {name: found[0] for name, found in accepted.items()}
        edits = {name: edit_fingerprint(*source) for name, source in sources.items()}  # taken again after each run
        runs: dict[str, dict[int, RunOutcome]] = {name: {} for name in names}
        pool = (RayLauncher(ray_num_cpus, ray_num_gpus) if launcher == "ray"
                else LocalLauncher(jobs if jobs is not None else default_jobs()))
        primary = metrics[0]
        bar = tqdm(total=len(names) * len(seed_list), unit="run", desc="compare", disable=None if progress is None
                   else not progress, dynamic_ncols=True)
        done, reused = 0, []

        def finished(outcome: RunOutcome) -> None:
            nonlocal done
            runs[outcome.schedule][outcome.seed] = outcome
            done += 1
            with tqdm.external_write_mode():
                echo(_line(outcome, shown[outcome.schedule], done, bar.total, metrics))
            bar.set_postfix_str(f"{primary}: {_short(metric_verdict(_sorted(runs), primary), shown)}", refresh=False)
            bar.update(1)

        with pool, bar:
            round_seeds = seed_list
            while True:
                todo: list[RunSpec] = []
                for seed in round_seeds:
                    for name, path, stage_file in zip(names, paths, stage_files):
                        folder = run_dir(out, name, seed)
                        kept = None if fresh else load_result(folder, accepted[name], metrics)
                        if kept is not None:
                            adopt_fingerprint(folder, fingerprints[name])  # a result saved before code counted
                            reused.append(folder)
                            finished(kept)
                        else:
                            todo.append(RunSpec(name, seed, str(path), stage_file, str(folder), tuple(metrics)))
                for name in names:  # finished runs of a changed config: say so before they are replaced
                    stale = None if fresh else replaced_runs(out, name, round_seeds, accepted[name])
                    if stale is not None:
                        with tqdm.external_write_mode():
                            warnings.warn(stale, UserWarning, stacklevel=2)
                earlier = {(spec.schedule, spec.seed): finished_bytes(spec.run_dir) for spec in todo}
                outcomes = pool.run(todo)
                try:
                    for outcome in outcomes:
                        if outcome.error is None and edit_fingerprint(*sources[outcome.schedule]) != edits[
                                outcome.schedule]:  # it may have trained either version: not kept
                            outcome = replace(outcome, metrics={}, error=_CHANGED)
                        record_result(run_dir(out, outcome.schedule, outcome.seed), outcome,
                                      fingerprints[outcome.schedule], earlier.pop((outcome.schedule, outcome.seed)))
                        finished(outcome)
                except BaseException:  # Ctrl-C: the runs in flight stop; those that had a finished result keep it
                    outcomes.close()
                    for (name, seed), raw in earlier.items():
                        if raw is not None:
                            restore_result(run_dir(out, name, seed), raw)
                    raise
                verdict_now = metric_verdict(_sorted(runs), primary)
                if not auto or verdict_now.decided or len(verdict_now.ranking) < 2 or len(seed_list) >= max_seeds:
                    break
                round_seeds = [max(seed_list) + 1]
                seed_list = [*seed_list, *round_seeds]
                bar.total += len(names)
                bar.refresh()
        if (versions := version_note(reused)) is not None:
            warnings.warn(versions, UserWarning, stacklevel=2)
        result_runs = _sorted(runs)
        note = _seeds_note(auto, seed_list, max_seeds, verdict_now, primary)
        shown_runs = {shown[name]: seed_runs for name, seed_runs in result_runs.items()}
        curves = plot_curves(shown_runs, curve_metric, out / "curves.png")
        report = write_report(shown_runs, {shown[n]: Path(c) for n, c in zip(names, configs)}, seed_list, metrics,
                              summaries, differences, reference, out, curves, seeds_note=note,
                              folders={shown[n]: n for n in names})
    return CompareResult(report=report, curves=curves, tensorboard=out / "runs", runs=result_runs,
                         warnings=differences, seeds=seed_list, decided=verdict_now.decided)


def _sorted(runs: Mapping[str, Mapping[int, RunOutcome]]) -> dict[str, list[RunOutcome]]:
    return {name: [by_seed[s] for s in sorted(by_seed)] for name, by_seed in runs.items()}


def _seeds_note(auto: bool, seeds: list[int], max_seeds: int, result: Any, metric: str) -> Optional[str]:
    if not auto:
        return None
    how = (f"Seeds: `--seeds auto` started with {min(AUTO_START_SEEDS, max_seeds)} and added one seed per round; it "
           f"stopped at {len(seeds)} seeds")
    if result.decided:
        return (how + f" because the verdict on {metric} was decided. Stopping once decided makes the 95% level "
                "somewhat optimistic (the test was looked at after every round).")
    if len(result.ranking) < 2:
        return how + f" because fewer than two schedules have results on {metric}."
    return how + f", the --max-seeds limit ({max_seeds}), without a decision on {metric}."
