"""What ``lightning-stages show`` prints and draws: a one-line summary, a table and a timeline PNG of a schedule."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Union

from lightning_stages.schedule import StageSchedule
from lightning_stages.stage import ResolvedStage

__all__ = ["PLOT_HINT", "format_summary", "format_table", "plot_timeline", "require_matplotlib"]

PLOT_HINT = "drawing needs matplotlib: pip install 'lightning-stages[plot]'"


def format_summary(schedule: StageSchedule) -> str:
    """The schedule in one line: how many stages over how many epochs, their ranges, whether teachers are needed.

    Example::

        >>> s = StageSchedule([{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True}],
        ...                   loss_weights={"bce": 1.0}, total_epochs=5)
        >>> format_summary(s)
        '1 stage over 5 epochs (kd [0, 2), base [2, 5)); teachers needed'
        >>> format_summary(StageSchedule([]))
        'no stage schedule: single-stage training with the base settings'
    """
    if not schedule.stages:
        return "no stage schedule: single-stage training with the base settings"
    total = schedule.total_epochs
    parts = [f"{r.name} [{r.start_epoch}, {r.end_epoch if r.end_epoch is not None else 'end'})"
             for r in schedule.timeline()]
    over = f" over {total} epochs" if total is not None else ""
    teachers = "; teachers needed" if schedule.needs_teachers else "; no teacher needed"
    count = len(schedule.stages)
    return f"{count} stage{'s' if count != 1 else ''}{over} ({', '.join(parts)}){teachers}"


def _number(value: float) -> str:
    return f"{value:g}"


def _weight_keys(schedule: StageSchedule, timeline: list[ResolvedStage]) -> list[str]:
    """The base loss weights' keys, then any other key a stage of the timeline sets, in order of appearance."""
    keys = list(schedule.base_loss_weights)
    for resolved in timeline:
        keys += [k for k in resolved.loss_weights if k not in keys]
    return keys


def format_table(schedule: StageSchedule) -> str:
    """The resolved schedule as a text table: epochs, stage, distillation, lambda and every loss weight.

    Example::

        >>> s = StageSchedule([{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True,
        ...                     "loss_weights": {"bce": 0}}], loss_weights={"bce": 1.0}, total_epochs=5)
        >>> print(format_table(s))
        epochs  stage     distillation  lambda  bce
        [0, 2)  kd (1/1)  on            1       0
        [2, 5)  base      off           1       1
    """
    timeline = schedule.timeline()
    keys = _weight_keys(schedule, timeline)
    header = ["epochs", "stage", "distillation", "lambda", *keys]
    rows = [header]
    for r in timeline:
        end = r.end_epoch if r.end_epoch is not None else "end"
        rows.append([f"[{r.start_epoch}, {end})", r.label if not r.is_base else r.name,
                     "on" if r.distillation else "off", _number(r.lambda_coef),
                     *(_number(r.loss_weights[k]) if k in r.loss_weights else "-" for k in keys)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Raises:
        ImportError: matplotlib is not installed (the message says how to get it).

    Example::

        >>> require_matplotlib().__name__
        'matplotlib.pyplot'
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(PLOT_HINT) from None
    return plt


def plot_timeline(schedule: StageSchedule, path: Union[str, os.PathLike]) -> Path:
    """Draw the loss weights and ``lambda_coef`` over the epochs, each stage shaded, into a PNG.

    Raises:
        ImportError: matplotlib is not installed (the message says how to get it).

    Example::

        >>> import tempfile, pathlib
        >>> s = StageSchedule([{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True}],
        ...                   loss_weights={"bce": 1.0}, total_epochs=4)
        >>> png = plot_timeline(s, pathlib.Path(tempfile.mkdtemp()) / "t.png")
        >>> png.stat().st_size > 0
        True
    """
    plt = require_matplotlib()
    timeline = schedule.timeline()
    last = timeline[-1]
    total = last.end_epoch if last.end_epoch is not None else last.start_epoch + max(1, last.start_epoch // 4 or 1)
    keys = _weight_keys(schedule, timeline)
    fig, (ax_w, ax_l) = plt.subplots(2, 1, sharex=True, figsize=(8, 5), gridspec_kw={"height_ratios": [2, 1]})
    ends = [r.end_epoch if r.end_epoch is not None else total for r in timeline]
    edges = [r.start_epoch for r in timeline] + [ends[-1]]
    for i, r in enumerate(timeline):
        for ax in (ax_w, ax_l):
            ax.axvspan(r.start_epoch, ends[i], color=f"C{i % 10}" if not r.is_base else "0.85", alpha=0.12, lw=0)
        ax_w.text((r.start_epoch + ends[i]) / 2, 1.01, r.name + (" (KD)" if r.distillation else ""),
                  transform=ax_w.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    top = max([max(r.loss_weights.values(), default=0.0) for r in timeline] + [1.0])
    for j, key in enumerate(keys):
        # equal weights would hide each other: shift each line by a hair
        shift = (j - (len(keys) - 1) / 2) * 0.012 * top
        values = [r.loss_weights.get(key, math.nan) + shift for r in timeline]
        ax_w.stairs(values, edges, label=key, lw=2, baseline=None, color=f"C{j % 10}")
    ax_w.set_ylabel("loss weight (lines nudged apart)")
    ax_w.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax_l.stairs([r.lambda_coef for r in timeline], edges, label="lambda_coef", lw=2, baseline=None, color="k")
    ax_l.stairs([1.0 if r.distillation else 0.0 for r in timeline], edges, label="distillation on",
                lw=1.5, ls="--", baseline=None, color="C3")
    ax_l.set_ylabel("distillation")
    ax_l.set_xlabel("epoch")
    ax_l.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
