"""The report of ``lightning-stages compare``: the table, the paired verdict, the costs and the validation curves."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lightning_stages.cli.plots import PLOT_HINT, require_matplotlib
from lightning_stages.cli.stats import TEST_SENTENCE, MetricVerdict, higher_is_better, paired_verdict
from lightning_stages.errors import printable

__all__ = ["RunOutcome", "metric_verdict", "plot_curves", "verdict", "write_report"]


@dataclass
class RunOutcome:
    """One training run of a comparison: the schedule, the seed, and what came of it.

    Attributes:
        schedule: the schedule's name.
        seed: the seed.
        metrics: the test metrics the run logged, ``{name: value}``.
        curves: ``{validation metric: [(epoch, value)]}`` after each epoch.
        seconds: the run's wall time.
        error: ``"Type: message"`` of what stopped the run; ``None`` when it finished.
        boundaries: ``(start epoch, stage name)`` of the resolved stages.
        distill_seconds: wall time of the training epochs that distilled (validation included).
        other_seconds: wall time of the other training epochs.
        teacher_forwards: forward calls of the teachers while training.
        teacher_samples: samples in those forward calls.
        reused: read from an earlier comparison's result instead of trained now.

    Example::

        >>> RunOutcome("joint", 0, metrics={"test/iou": 0.5}).error is None
        True
    """

    schedule: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    error: Optional[str] = None
    boundaries: list[tuple[int, str]] = field(default_factory=list)
    distill_seconds: float = 0.0
    other_seconds: float = 0.0
    teacher_forwards: int = 0
    teacher_samples: int = 0
    reused: bool = False

    def check_metrics(self, metrics: Sequence[str]) -> None:
        """Mark the run failed if it logged none of one of ``metrics`` (a misspelt ``--metrics``), with the error
        every compare gives for it (:data:`MISSING_METRIC`); what it logged is kept, so the right names reuse it."""
        if missing := [m for m in metrics if m not in self.metrics]:
            self.error = f"{MISSING_METRIC}{', '.join(missing)} (logged: {', '.join(self.metrics) or 'nothing'})"


#: how the error of a run without a metric of ``--metrics`` begins (such a run is kept, not trained again)
MISSING_METRIC = "KeyError: the test step logged no "


def metric_verdict(runs: Mapping[str, Sequence[RunOutcome]], metric: str, label: Optional[str] = None) -> MetricVerdict:
    """The paired verdict on ``metric`` of the finished runs (a run whose value is not finite is left out).

    Example::

        >>> runs = {"a": [RunOutcome("a", 0, metrics={"m": 0.5}), RunOutcome("a", 1, error="ValueError: x")],
        ...         "b": [RunOutcome("b", 0, metrics={"m": 0.4}), RunOutcome("b", 1, metrics={"m": 0.3})]}
        >>> metric_verdict(runs, "m").text.startswith("Only 1 of the 2 seeds run has a finite result for both a and b")
        True
    """
    scores = {name: {r.seed: r.metrics[metric] for r in seed_runs if r.error is None and metric in r.metrics}
              for name, seed_runs in runs.items()}
    seeds = sorted({r.seed for seed_runs in runs.values() for r in seed_runs})
    return paired_verdict(scores, metric if label is None else label, higher_is_better(metric), seeds_run=seeds)


def verdict(scores: Mapping[str, Union[Sequence[float], Mapping[int, float]]], metric: str = "test IoU",
            higher_is_better: bool = True) -> str:
    """The paired verdict in words (:func:`~lightning_stages.cli.stats.paired_verdict`).

    Args:
        scores: ``{schedule: {seed: value}}``, or ``{schedule: [value per seed]}`` with the same seeds in order.
        metric: the metric's label.
        higher_is_better: the metric's direction.

    Example::

        >>> print(verdict({"a": [0.80, 0.82, 0.81], "b": [0.70, 0.71, 0.69]})[:25])
        **a** is best on test IoU
        >>> "indistinguishable" in verdict({"a": [0.80, 0.70, 0.75], "b": [0.76, 0.74, 0.75]})
        True
    """
    by_seed = {name: dict(v) if isinstance(v, Mapping) else dict(enumerate(v)) for name, v in scores.items()}
    return paired_verdict(by_seed, metric, higher_is_better).text


def _cell(text: object) -> str:
    r"""``text`` as one cell of a Markdown table row: a ``|`` escaped (``\|``), a line break and other control
    characters written as escapes (a file name may hold either).

    Example::

        >>> _cell("a|b\nc")
        'a\\|b\\nc'
    """
    return printable(text, limit=4096).replace("|", "\\|")


def _label(metric: str) -> str:
    split, _, name = metric.rpartition("/")
    pretty = {"iou": "IoU", "dice": "Dice", "acc": "accuracy"}.get(name, name)
    return f"{split} {pretty}".strip()


def plot_curves(runs: Mapping[str, Sequence[RunOutcome]], metric: str, path: Path) -> Optional[Path]:
    """Draw a validation metric per epoch into a PNG: the mean over seeds, the min-max band and stage boundaries.

    Args:
        runs: ``{schedule: [per-seed outcome]}``; finished runs with a curve of ``metric`` are drawn, with the stage
            boundaries of their ``boundaries``.
        metric: the validation metric of the curves.
        path: the PNG to write.

    Returns:
        ``path``, or ``None`` without matplotlib.

    Example::

        >>> import tempfile, pathlib
        >>> runs = {"joint": [RunOutcome("joint", 0, curves={"val/iou": [(0, 0.4), (1, 0.6)]}),
        ...                   RunOutcome("joint", 1, curves={"val/iou": [(0, 0.5), (1, 0.7)]},
        ...                              boundaries=[(0, "kd"), (1, "base")])]}
        >>> png = plot_curves(runs, "val/iou", pathlib.Path(tempfile.mkdtemp()) / "curves.png")
        >>> png.stat().st_size > 0
        True
    """
    try:
        plt = require_matplotlib()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, seed_runs) in enumerate(runs.items()):
        color = f"C{i % 10}"
        finished = [r for r in seed_runs if r.error is None and r.curves.get(metric)]
        curves = [dict(r.curves[metric]) for r in finished]
        if not curves:
            continue
        epochs = sorted(set().union(*curves))
        values = [[c[e] for c in curves if e in c] for e in epochs]
        means = [statistics.fmean(v) for v in values]
        ax.plot([e + 1 for e in epochs], means, color=color, lw=2, label=f"{name} ({len(curves)} seed"
                f"{'s' if len(curves) != 1 else ''})")
        if len(curves) > 1:
            ax.fill_between([e + 1 for e in epochs], [min(v) for v in values], [max(v) for v in values],
                            color=color, alpha=0.15, lw=0)
        boundaries = next((r.boundaries for r in finished if r.boundaries), [])
        for start, stage in boundaries[1:]:
            ax.axvline(start + 0.5, color=color, ls="--", lw=1, alpha=0.8)
            ax.annotate(f"{name}: {stage}", (start + 0.5, 0.02 + 0.06 * i), xycoords=("data", "axes fraction"),
                        fontsize=7, color=color, ha="left", va="bottom")
    ax.set_xlabel("epoch (validation after epoch)")
    ax.set_ylabel(_label(metric))
    ax.set_title(f"{_label(metric)} per epoch; dashed lines: stage boundaries; band: min-max over seeds")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run finished", transform=ax.transAxes, ha="center", va="center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        _replace(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path


def _replace(path: Path, write: Any) -> None:
    """Write ``path`` through a temporary file and a rename: a killed or failed write leaves the earlier file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _format_mean_std(values: Sequence[float]) -> str:
    """Mean ± std of the finite values; values that are not finite (nan, inf) are counted as left out."""
    finite = [v for v in values if math.isfinite(v)]
    bad = [v for v in values if not math.isfinite(v)]
    if not finite:
        text = "-"
    elif len(finite) == 1:
        text = f"{finite[0]:.3f}"
    else:
        text = f"{statistics.fmean(finite):.3f} ± {statistics.stdev(finite):.3f}"
    if bad:
        text += f" ({len(bad)} {'/'.join(sorted({str(v) for v in bad}))} left out)"
    return text


def _verdict_lines(result_runs: Mapping[str, Sequence[RunOutcome]], metrics: Sequence[str]) -> list[str]:
    lines = ["## Verdict", "", TEST_SENTENCE, ""]
    table = ["", "| metric | best | against | seeds | mean difference | interval (Holm) | Holm p | separated |",
             "|---|---|---|---|---|---|---|---|"]
    for i, metric in enumerate(metrics):
        higher = higher_is_better(metric)
        result = metric_verdict(result_runs, metric, _label(metric))
        direction = "higher is better" if higher else "lower is better"
        lines.append(f"- **{_label(metric)}** ({'primary, ' if i == 0 else ''}{direction}): {result.text}")
        best = result.ranking[0][0] if result.ranking else "-"
        for c in result.comparisons:
            interval = f"{c.low:.3f} to {c.high:.3f} ({c.level:.1%})" if math.isfinite(c.high) else "-"
            table.append(f"| {_cell(_label(metric))} | {_cell(best)} | {_cell(c.other)} | {c.seeds} | {c.difference:.4f} | {interval} | "
                         f"{c.p_holm:.3g} | {'yes' if c.separated else 'no'} |")
    return lines + (table if len(table) > 3 else [])


def _cost_lines(result_runs: Mapping[str, Sequence[RunOutcome]]) -> list[str]:
    lines = ["## Cost per schedule", "",
             "Mean per finished run. Distilling epochs are those in which distillation was on at any training batch "
             "(their validation included); teacher forwards are counted while training.", "",
             "| schedule | wall time per run | distilling epochs | other epochs | teacher forwards | teacher images |",
             "|---|---|---|---|---|---|"]
    for name, runs in result_runs.items():
        ok = [r for r in runs if r.error is None]
        if not ok:
            lines.append(f"| {_cell(name)} | - | - | - | - | - |")
            continue
        mean = {key: statistics.fmean(getattr(r, key) for r in ok)
                for key in ("seconds", "distill_seconds", "other_seconds", "teacher_forwards", "teacher_samples")}
        lines.append(f"| {_cell(name)} | {mean['seconds']:.1f} s | {mean['distill_seconds']:.1f} s | "
                     f"{mean['other_seconds']:.1f} s | {mean['teacher_forwards']:.0f} | {mean['teacher_samples']:.0f} |")
    return lines


def write_report(result_runs: Mapping[str, Sequence[RunOutcome]], configs: Mapping[str, Path], seeds: Sequence[int],
                 metrics: Sequence[str], schedules: Mapping[str, str], differences: Sequence[str],
                 reference: Optional[Mapping[str, Mapping[str, float]]], out: Path, curves: Optional[Path],
                 seeds_note: Optional[str] = None, folders: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``out/report.md``: the table, the paired verdict per metric, the costs, failed runs, every run.

    Args:
        result_runs: ``{schedule: [per-seed outcome]}``.
        configs: ``{schedule: config file}``.
        seeds: the seeds every schedule ran with.
        metrics: the test metrics of the table, the first being the primary one.
        schedules: ``{schedule: one-line summary}``.
        differences: the like-for-like warnings.
        reference: extra rows, e.g. ``{"teacher": {"test/iou": 0.9}}``.
        out: the output directory.
        curves: the curves PNG, or ``None`` when none was drawn.
        seeds_note: how the number of seeds was chosen (``--seeds auto``), one sentence.
        folders: ``{schedule: run folder name}`` where the folder under ``runs/`` is not the schedule's name (a
            shorter name shown in the report).

    Returns:
        The path of ``report.md``.

    Example::

        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> runs = {"a": [RunOutcome("a", 0, metrics={"test/iou": 0.8})],
        ...         "b": [RunOutcome("b", 0, error="ValueError: boom")]}
        >>> report = write_report(runs, {"a": out / "a.yaml", "b": out / "b.yaml"}, [0], ["test/iou"], {}, [], None,
        ...                       out, None)
        >>> [line for line in report.read_text().splitlines() if line.startswith("| b |")][:2]
        ['| b | - | 0.0 s | 0/1 (FAILED) |', '| b | - | - | - | - | - |']
    """
    lines = ["# Stage schedule comparison", ""]
    all_runs = [r for runs in result_runs.values() for r in runs]
    total = sum(r.seconds for r in all_runs)
    reused = sum(r.reused for r in all_runs)
    lines.append(f"{len(result_runs)} schedules x {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
                 f"({', '.join(map(str, seeds))}), {total / 60:.1f} min of training"
                 + (f" ({reused} of {len(all_runs)} runs reused from an earlier comparison)" if reused else "")
                 + ". Metrics on the test split after the last epoch; the table gives mean ± std over seeds "
                 "(sample std, unpaired, for reading); the verdict below comes from the paired analysis.")
    if seeds_note:
        lines += ["", seeds_note]
    lines.append("")
    if differences:
        lines.append("> **Warning: not like for like.** The configs differ in more than the schedule:")
        lines += [f"> - {d}" for d in differences]
        lines.append("")
    header = ["schedule", *(_cell(_label(m)) for m in metrics), "wall time per run", "runs ok"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, runs in result_runs.items():
        ok = [r for r in runs if r.error is None]
        cells = [_format_mean_std([r.metrics[m] for r in ok if m in r.metrics]) for m in metrics]
        seconds = f"{statistics.fmean([r.seconds for r in runs]):.1f}" if runs else "-"
        status = f"{len(ok)}/{len(runs)}" + (" (FAILED)" if len(ok) < len(runs) else "")
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + f" | {seconds} s | {status} |")
    for name, values in (reference or {}).items():
        cells = [f"{values[m]:.3f}" if m in values else "-" for m in metrics]
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " | - | reference |")
    lines += ["", *_verdict_lines(result_runs, metrics), "", *_cost_lines(result_runs)]
    failed = [(name, r.seed, r.error.splitlines() or [""]) for name, runs in result_runs.items() for r in runs
              if r.error is not None]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- **{name}**, seed {seed}: failed: `{error[0][:300]}`"
                  + ("".join(f"\n  {line}" for line in error[1:8])) for name, seed, error in failed]
    lines += ["", "## Schedules", ""]
    for name, config in configs.items():
        folder = (folders or {}).get(name, name)
        where = f"`{config}`" + (f", runs in `runs/{folder}/`" if folder != name else "")
        lines.append(f"- **{name}** ({where}): {schedules.get(name, 'not read')}")
    metric_cells = " | ".join(_cell(_label(m)) for m in metrics)
    lines += ["", "## Runs", "", f"| schedule | seed | {metric_cells} | seconds | status |",
              "|" + "---|" * (len(metrics) + 4)]
    for name, runs in result_runs.items():
        for r in runs:
            cells = [f"{r.metrics[m]:.4f}" if m in r.metrics else "-" for m in metrics]
            status = "failed" if r.error is not None else "ok (reused)" if r.reused else "ok"
            lines.append(f"| {_cell(name)} | {r.seed} | " + " | ".join(cells) + f" | {r.seconds:.1f} | {status} |")
    lines += ["", "## Files", ""]
    if curves is not None:
        lines.append(f"- `{curves.name}`: validation curves per schedule, stage boundaries dashed.")
    else:
        lines.append(f"- no curves.png: {PLOT_HINT}")
    lines.append(f"- `runs/<schedule>/seed_<n>/`: each run's `result.json` and TensorBoard events "
                 f"(`tensorboard --logdir {out / 'runs'}`).")
    report = out / "report.md"  # a file name that is not UTF-8 (a surrogate escape) is written as \udcff
    _replace(report, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="backslashreplace"))
    return report
