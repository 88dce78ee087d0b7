"""The report of ``lightning-stages compare``: the verdict, the table of runs and the validation curves."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lightning_stages.cli.plots import PLOT_HINT, require_matplotlib

__all__ = ["RunOutcome", "plot_curves", "verdict", "write_report"]


@dataclass
class RunOutcome:
    """One training run of a comparison: the schedule, the seed, and what came of it.

    Attributes:
        schedule: the schedule's name.
        seed: the seed.
        metrics: the test metrics, ``{name: value}``.
        curve: ``(epoch, value)`` of the validation metric after each epoch.
        seconds: the run's wall time.
        error: ``"Type: message"`` of what stopped the run; ``None`` when it finished.

    Example::

        >>> RunOutcome("joint", 0, metrics={"test/iou": 0.5}).error is None
        True
    """

    schedule: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(scores: Mapping[str, Sequence[float]], metric: str = "test IoU", higher_is_better: bool = True) -> str:
    """Name a winner only where the gap to the runner-up exceeds the spread across seeds.

    The best mean wins when ``|mean_best - mean_second| > std_best + std_second`` (sample std over seeds), i.e.
    the one-std intervals do not overlap. With fewer than two seeds the spread is unknown and nobody wins.

    Example::

        >>> print(verdict({"a": [0.80, 0.82, 0.81], "b": [0.70, 0.71, 0.69]})[:62])
        **a** is best on test IoU: 0.810 ± 0.010 against 0.700 ± 0.010
        >>> verdict({"a": [0.80, 0.70], "b": [0.76, 0.74]})[:44]
        'The schedules are indistinguishable on test '
    """
    ranked = sorted(((name, *_mean_std(list(v))) for name, v in scores.items() if len(v) > 0),
                    key=lambda t: t[1], reverse=higher_is_better)
    if len(ranked) < 2:
        return f"Only {len(ranked)} schedule has results on {metric}; nothing to compare."
    if min(len(scores[name]) for name, _, _ in ranked) < 2:
        return (f"With one seed per schedule the spread across seeds is unknown, so no winner is named on {metric} "
                "(run with --seeds 3 or more).")
    (best, m1, s1), (second, m2, s2) = ranked[0], ranked[1]
    gap, spread = abs(m1 - m2), s1 + s2
    if gap > spread:
        return (f"**{best}** is best on {metric}: {m1:.3f} ± {s1:.3f} against {m2:.3f} ± {s2:.3f} for {second}, "
                f"a gap of {gap:.3f}, beyond the spread across seeds ({spread:.3f}).")
    return (f"The schedules are indistinguishable on {metric} on this budget: the best mean ({best}, {m1:.3f} ± "
            f"{s1:.3f}) leads {second} ({m2:.3f} ± {s2:.3f}) by {gap:.3f}, within the spread across seeds "
            f"({spread:.3f}).")


def _label(metric: str) -> str:
    split, _, name = metric.rpartition("/")
    pretty = {"iou": "IoU", "dice": "Dice", "acc": "accuracy"}.get(name, name)
    return f"{split} {pretty}".strip()


def plot_curves(runs: Mapping[str, Sequence[RunOutcome]], boundaries: Mapping[str, list[tuple[int, str]]],
                metric: str, path: Path) -> Optional[Path]:
    """Draw a validation metric per epoch into a PNG: the mean over seeds, the min-max band and stage boundaries.

    Args:
        runs: ``{schedule: [per-seed outcome]}``; finished runs with a curve are drawn.
        boundaries: ``{schedule: [(start epoch, stage name)]}`` of the resolved timeline.
        metric: the validation metric of the curves, for the labels.
        path: the PNG to write.

    Returns:
        ``path``, or ``None`` without matplotlib.

    Example::

        >>> import tempfile, pathlib
        >>> runs = {"joint": [RunOutcome("joint", 0, curve=[(0, 0.4), (1, 0.6)]),
        ...                   RunOutcome("joint", 1, curve=[(0, 0.5), (1, 0.7)])]}
        >>> png = plot_curves(runs, {"joint": [(0, "kd"), (1, "base")]}, "val/iou",
        ...                   pathlib.Path(tempfile.mkdtemp()) / "curves.png")
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
        curves = [dict(r.curve) for r in seed_runs if r.error is None and r.curve]
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
        for start, stage in boundaries.get(name, [])[1:]:
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _format_mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"


def write_report(result_runs: Mapping[str, Sequence[RunOutcome]], configs: Mapping[str, Path], seeds: Sequence[int],
                 metrics: Sequence[str], schedules: Mapping[str, str], differences: Sequence[str],
                 reference: Optional[Mapping[str, Mapping[str, float]]], out: Path, curves: Optional[Path]) -> Path:
    """Write ``out/report.md``: mean ± std over seeds, the verdict per metric, failed runs, schedules, every run.

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

    Returns:
        The path of ``report.md``.

    Example::

        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> runs = {"a": [RunOutcome("a", 0, metrics={"test/iou": 0.8})],
        ...         "b": [RunOutcome("b", 0, error="ValueError: boom")]}
        >>> report = write_report(runs, {"a": out / "a.yaml", "b": out / "b.yaml"}, [0], ["test/iou"], {}, [], None,
        ...                       out, None)
        >>> [line for line in report.read_text().splitlines() if line.startswith("| b |")]
        ['| b | - | 0.0 s | 0/1 (FAILED) |', '| b | 0 | - | 0.0 | failed |']
    """
    lines = ["# Stage schedule comparison", ""]
    total = sum(r.seconds for runs in result_runs.values() for r in runs)
    lines.append(f"{len(result_runs)} schedules x {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
                 f"({', '.join(map(str, seeds))}), {total / 60:.1f} min of training. Metrics on the test split after "
                 "the last epoch, mean ± std over seeds (sample std).")
    lines.append("")
    if differences:
        lines.append("> **Warning: not like for like.** The configs differ in more than the schedule:")
        lines += [f"> - {d}" for d in differences]
        lines.append("")
    header = ["schedule", *(_label(m) for m in metrics), "wall time per run", "runs ok"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, runs in result_runs.items():
        ok = [r for r in runs if r.error is None]
        cells = [_format_mean_std([r.metrics[m] for r in ok]) for m in metrics]
        seconds = f"{statistics.fmean([r.seconds for r in runs]):.1f}" if runs else "-"
        status = f"{len(ok)}/{len(runs)}" + (" (FAILED)" if len(ok) < len(runs) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds} s | {status} |")
    for name, values in (reference or {}).items():
        cells = [f"{values[m]:.3f}" if m in values else "-" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " | - | reference |")
    lines += ["", "## Verdict", ""]
    for i, metric in enumerate(metrics):
        scores = {name: [r.metrics[metric] for r in runs if r.error is None] for name, runs in result_runs.items()}
        text = verdict(scores, _label(metric))
        lines.append(f"- {text}" if i else f"- **{_label(metric)} (primary):** {text}")
    failed = [(name, r.seed, r.error) for name, runs in result_runs.items() for r in runs if r.error is not None]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- **{name}**, seed {seed}: failed: `{error.splitlines()[0][:300]}`"
                  + ("".join(f"\n  {line}" for line in error.splitlines()[1:8])) for name, seed, error in failed]
    lines += ["", "## Schedules", ""]
    for name, config in configs.items():
        lines.append(f"- **{name}** (`{config}`): {schedules.get(name, 'not read')}")
    metric_cells = " | ".join(_label(m) for m in metrics)
    lines += ["", "## Runs", "", f"| schedule | seed | {metric_cells} | seconds | status |",
              "|" + "---|" * (len(metrics) + 4)]
    for name, runs in result_runs.items():
        for r in runs:
            cells = [f"{r.metrics[m]:.4f}" if m in r.metrics else "-" for m in metrics]
            status = "ok" if r.error is None else "failed"
            lines.append(f"| {name} | {r.seed} | " + " | ".join(cells) + f" | {r.seconds:.1f} | {status} |")
    lines += ["", "## Files", ""]
    if curves is not None:
        lines.append(f"- `{curves.name}`: validation curves per schedule, stage boundaries dashed.")
    else:
        lines.append(f"- no curves.png: {PLOT_HINT}")
    lines.append(f"- `tb/`: the TensorBoard runs (`tensorboard --logdir {out / 'tb'}`).")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
