"""What ``lightning-stages show`` prints: a one-line summary and a table of a resolved schedule (pure text)."""

from __future__ import annotations

from lightning_stages.schedule.stage import ResolvedStage
from lightning_stages.schedule.stage_schedule import StageSchedule

__all__ = ["format_summary", "format_table", "weight_keys"]


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


def weight_keys(schedule: StageSchedule, timeline: list[ResolvedStage]) -> list[str]:
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
    keys = weight_keys(schedule, timeline)
    header = ["epochs", "stage", "distillation", "lambda", *keys]
    rows = [header]
    for r in timeline:
        end = r.end_epoch if r.end_epoch is not None else "end"
        rows.append([f"[{r.start_epoch}, {end})", r.label if not r.is_base else r.name,
                     "on" if r.distillation else "off", _number(r.lambda_coef),
                     *(_number(r.loss_weights[k]) if k in r.loss_weights else "-" for k in keys)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
