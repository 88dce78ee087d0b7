"""The schedule as text: the stage line and ``stage/*`` scalars of each epoch, and what ``lightning-stages show``
prints (a one-line summary and a table of a resolved schedule)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Optional

from lightning_stages.errors import printable
from lightning_stages.schedule.ramps import effective_lambda
from lightning_stages.schedule.stage import ResolvedStage
from lightning_stages.schedule.stage_schedule import StageSchedule

__all__ = ["format_range", "format_stage_line", "format_summary", "format_table", "ramp_start", "stage_metrics",
           "weight_keys"]


def format_range(schedule: StageSchedule, resolved: ResolvedStage, ended: Collection[int] = (),
                 plateau_caps: Optional[Collection[Optional[int]]] = None) -> str:
    """``[start, end)`` of a range of the timeline; a stage a plateau may end shows ``up to`` its cap, and so does the
    start of what follows it. ``ended``: indices of stages whose plateau already ended them (no longer "up to").

    Example::

        >>> s = StageSchedule([{"name": "kd", "start_epoch": 0, "end_epoch": 6, "monitor": "val/loss", "patience": 2},
        ...                    {"name": "ft", "start_epoch": 6}], total_epochs=9)
        >>> [format_range(s, r) for r in s.timeline()]
        ['[0, up to 6)', '[up to 6, 9)']
    """
    if plateau_caps is None:  # given by the callers that format every range: a schedule of many stages stays fast
        plateau_caps = _plateau_caps(schedule, ended)
    start = f"up to {resolved.start_epoch}" if resolved.start_epoch in plateau_caps else str(resolved.start_epoch)
    end = str(resolved.end_epoch) if resolved.end_epoch is not None else "end"
    if resolved.index is not None and resolved.index not in ended and schedule.stages[resolved.index].ends_on_plateau:
        end = f"up to {end}"
    return f"[{start}, {end})"


def _plateau_caps(schedule: StageSchedule, ended: Collection[int]) -> set[Optional[int]]:
    """The epochs at which a stage that a plateau may end is cut at the latest (those in ``ended`` aside)."""
    return {schedule.end_of(stage) for index, stage in enumerate(schedule.stages)
            if stage.ends_on_plateau and index not in ended}


def format_summary(schedule: StageSchedule, ended: Collection[int] = ()) -> str:
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
    total = schedule.total_steps if schedule.unit == "step" else schedule.total_epochs
    caps = _plateau_caps(schedule, ended)
    parts = [f"{printable(r.name, 40)} {format_range(schedule, r, ended, caps)}" for r in schedule.timeline()]
    over = f" over {total} {schedule.unit}s" if total is not None else ""
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


def ramp_start(schedule: StageSchedule, resolved: ResolvedStage) -> Optional[ResolvedStage]:
    """The values at the first batch of a ramping stage (those in force before it); ``None`` without a ramp.

    Example::

        >>> s = StageSchedule([{"start_step": 0, "end_step": 9, "distillation": True},
        ...                    {"start_step": 9, "ramp_steps": 3}], total_steps=20)
        >>> ramp_start(s, s.timeline()[1]).lambda_coef, ramp_start(s, s.timeline()[0])
        (1.0, None)
    """
    if resolved.index is None or schedule.stages[resolved.index].ramp_length is None:
        return None
    start = resolved.start_epoch
    return schedule.at_step(start) if schedule.unit == "step" else schedule.at(start)


def _ramp_cell(schedule: StageSchedule, resolved: ResolvedStage) -> str:
    if resolved.index is None:
        return ""
    stage = schedule.stages[resolved.index]
    if stage.ramp_length is None:
        return ""
    unit = "steps" if stage.ramp_steps is not None else "epochs"
    return f"{stage.ramp_shape or 'linear'}, {_number(stage.ramp_length)} {unit}"


def format_table(schedule: StageSchedule, ended: Collection[int] = ()) -> str:
    """The resolved schedule as a text table: epochs (or steps), stage, distillation, lambda and every loss weight
    (and the ``data`` column if a stage names its data).

    A stage with a ramp shows ``before -> after`` where a value ramps, and the ramp's shape and length. Plateau
    stages show ``up to`` their cap (:func:`format_range`).

    Stage names and loss names are shown with control characters escaped (:func:`~lightning_stages.errors.printable`):
    a name can neither add a row nor send escape sequences to the terminal.

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
    with_data = any(r.data is not None for r in timeline)
    ramps = any(stage.ramp_length is not None for stage in schedule.stages)
    header = [f"{schedule.unit}s", "stage", "distillation", "lambda", *(printable(k, 40) for k in keys), *(["ramp"] if ramps else []),
              *(["data"] if with_data else [])]
    rows = [header]
    caps = _plateau_caps(schedule, ended)

    def cell(before: str, after: str) -> str:
        return after if before == after else f"{before} -> {after}"

    for r in timeline:
        b = ramp_start(schedule, r) or r
        rows.append([format_range(schedule, r, ended, caps), printable(r.label if not r.is_base else r.name, 60),
                     cell("on" if b.distillation else "off", "on" if r.distillation else "off"),
                     cell(_number(b.lambda_coef), _number(effective_lambda(r) if b is not r else r.lambda_coef)),
                     *(cell(_number(b.loss_weights[k]), _number(r.loss_weights[k])) if k in r.loss_weights else "-"
                       for k in keys), *([_ramp_cell(schedule, r)] if ramps else []),
                     *([printable(r.data) if r.data is not None else "-"] if with_data else [])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def format_stage_line(epoch: int, resolved: ResolvedStage) -> str:
    """The one human-readable line logged at each epoch start.

    Example::

        >>> r = ResolvedStage("distill_only", 0, 1, 2, 0, 100, True, 1.0, {"bce": 0.0, "focal": 0.0})
        >>> format_stage_line(3, r)
        "epoch 3: stage 'distill_only' (1/2), use_distillation=True, lambda_coef=1.0, loss_weights: bce=0.0 focal=0.0"
    """
    position = f"{resolved.position}/{resolved.num_stages}" if not resolved.is_base else "no stage"
    weights = " ".join(f"{printable(k)}={v:g}" if v != int(v) else f"{printable(k)}={v}"
                       for k, v in resolved.loss_weights.items())  # a loss name cannot add a line either
    data = f", data={resolved.data!r}" if resolved.data is not None else ""
    return (
        f"epoch {epoch}: stage {resolved.name!r} ({position}), use_distillation={resolved.distillation}, "
        f"lambda_coef={resolved.lambda_coef}, loss_weights: {weights or '(none)'}{data}"
    )


def stage_metrics(resolved: ResolvedStage) -> dict[str, float]:
    """The ``stage/*`` scalars logged once per epoch.

    Example::

        >>> stage_metrics(ResolvedStage("a", 0, 1, 1, 0, None, True, 0.5, {"cls": 2.0}))
        {'stage/number': 1.0, 'stage/use_distillation': 1.0, 'stage/lambda_coef': 0.5, 'stage/weight_cls': 2.0}
    """
    metrics = {
        "stage/number": float(resolved.position or 0),
        "stage/use_distillation": float(resolved.distillation),
        "stage/lambda_coef": float(resolved.lambda_coef),
    }
    metrics.update({f"stage/weight_{k}": float(v) for k, v in resolved.loss_weights.items()})
    return metrics
