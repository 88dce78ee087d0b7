"""The PNGs of the command line: a schedule's timeline (``show --plot``) and the curves of ``compare``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Union

from lightning_stages.errors import printable
from lightning_stages.schedule import ResolvedStage, StageSchedule
from lightning_stages.schedule.ramps import effective_lambda
from lightning_stages.schedule.render import weight_keys

__all__ = ["PLOT_HINT", "plot_timeline", "require_matplotlib"]

PLOT_HINT = "drawing needs matplotlib: pip install 'lightning-stages[plot]'"


def _label(text: str) -> str:
    """A name as matplotlib draws it: control characters escaped, ``$`` not taken for mathtext."""
    return printable(text, 40).replace("$", r"\$")


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Raises:
        ImportError: matplotlib is not installed (the message says how to get it).
        ValueError, ArithmeticError: values matplotlib cannot draw (weights near the largest float).

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


_RAMP_SAMPLES = 48  # points along a ramp


def timeline_points(schedule: StageSchedule, end: int) -> list[tuple[float, ResolvedStage]]:
    """``(x, values)`` along the schedule up to ``end`` (epochs or steps), from its pure resolution: two points per
    range (flat), and samples along each ramp (a slope). An epoch stage's ``ramp_steps`` is drawn as a jump: the
    steps per epoch are known only in a run.

    Example::

        >>> s = StageSchedule([{"start_epoch": 0, "end_epoch": 2, "distillation": True},
        ...                    {"start_epoch": 2, "ramp_epochs": 1}], total_epochs=4)
        >>> [(x, r.distillation, r.lambda_coef) for x, r in timeline_points(s, 4) if x in (1.0, 2.5, 3.0)]
        [(2.5, True, 0.5), (3.0, False, 1.0)]
    """
    points: list[tuple[float, ResolvedStage]] = []
    for r in schedule.timeline():
        stage = schedule.stages[r.index] if r.index is not None else None
        if stage is not None and schedule.unit == "step" and stage.ramp_steps is not None:
            for k in range(_RAMP_SAMPLES + 1):
                step = r.start_epoch + round(stage.ramp_steps * k / _RAMP_SAMPLES)
                points.append((step, schedule.at_step(step)))
        elif stage is not None and stage.ramp_epochs is not None:
            for k in range(_RAMP_SAMPLES + 1):
                x = r.start_epoch + stage.ramp_epochs * k / _RAMP_SAMPLES
                epoch = math.floor(x)
                points.append((x, schedule.at(epoch, round((x - epoch) * 1000), 1000)))
        else:  # no ramp, or ramp_steps in an epoch schedule (a jump here)
            points.append((r.start_epoch, r))
        points.append((r.end_epoch if r.end_epoch is not None else end, r))
    return points


def plot_timeline(schedule: StageSchedule, path: Union[str, os.PathLike]) -> Path:
    """Draw the loss weights and ``lambda_coef`` over the epochs (or steps), each stage shaded, ramps as slopes,
    into a PNG.

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
    keys = weight_keys(schedule, timeline)
    fig, (ax_w, ax_l) = plt.subplots(2, 1, sharex=True, figsize=(8, 5), gridspec_kw={"height_ratios": [2, 1]})
    try:
        return _draw(fig, ax_w, ax_l, schedule, timeline, total, keys, Path(path))
    finally:
        plt.close(fig)


def _draw(fig: Any, ax_w: Any, ax_l: Any, schedule: StageSchedule, timeline: list[ResolvedStage],
          total: int, keys: list[str], path: Path) -> Path:
    """The drawing of :func:`plot_timeline` into its figure, saved to ``path``."""
    ends = [r.end_epoch if r.end_epoch is not None else total for r in timeline]
    points = timeline_points(schedule, ends[-1])
    xs = [x for x, _ in points]
    for i, r in enumerate(timeline):
        for ax in (ax_w, ax_l):
            ax.axvspan(r.start_epoch, ends[i], color=f"C{i % 10}" if not r.is_base else "0.85", alpha=0.12, lw=0)
        # a stage a plateau may end is drawn to its cap and labelled "up to" it
        plateau = r.index is not None and schedule.stages[r.index].ends_on_plateau
        label = _label(r.name) + (" (KD)" if r.distillation else "") + (f"\nup to {ends[i]}" if plateau else "")
        if plateau:
            for ax in (ax_w, ax_l):
                ax.axvline(ends[i], color="0.3", lw=1, ls=":")
        ax_w.text((r.start_epoch + ends[i]) / 2, 1.01, label,
                  transform=ax_w.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    top = max([max(r.loss_weights.values(), default=0.0) for r in timeline] + [1.0])
    for j, key in enumerate(keys):
        # equal weights would hide each other: shift each line by a hair
        shift = (j - (len(keys) - 1) / 2) * 0.012 * top
        ax_w.plot(xs, [r.loss_weights.get(key, math.nan) + shift for _, r in points], label=_label(key), lw=2,
                  color=f"C{j % 10}")
    ax_w.set_ylabel("loss weight (lines nudged apart)")
    if keys:
        ax_w.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    else:  # an empty legend would be a matplotlib warning on the user's terminal
        ax_w.text(0.5, 0.5, "no loss weights in this schedule", transform=ax_w.transAxes, ha="center", va="center")
    ax_l.plot(xs, [effective_lambda(r) for _, r in points], label="lambda_coef (0 when off)", lw=2, color="k")
    ax_l.plot(xs, [1.0 if r.distillation else 0.0 for _, r in points], label="distillation on", lw=1.5, ls="--",
              color="C3")
    ax_l.set_ylabel("distillation")
    ax_l.set_xlabel(schedule.unit)
    ax_l.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")  # as named: matplotlib would add .png to "...png"
    return path
