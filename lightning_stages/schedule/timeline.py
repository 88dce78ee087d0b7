"""A schedule range by range: its stages and the gaps between them, in its unit (epochs or optimizer steps), and the
queries the callback and the CLI ask of them. Pure functions of a :class:`~lightning_stages.StageSchedule`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from lightning_stages.errors import stage_label
from lightning_stages.schedule.stage import BASE_STAGE_NAME, ResolvedStage, Stage, stage_name_of

if TYPE_CHECKING:
    from lightning_stages.schedule.stage_schedule import StageSchedule

__all__ = ["cut_short", "distilling_until", "first_distilling_label", "gap_around", "timeline", "uncovered_ranges"]


def _ordered(schedule: StageSchedule) -> list[tuple[int, Stage]]:
    """``(index as written, stage)`` by start."""
    return sorted(enumerate(schedule.stages), key=lambda item: item[1].start)


def gap_around(schedule: StageSchedule, position: int, total: Optional[int]) -> tuple[int, Optional[int]]:
    """The uncovered range ``[start, end)`` around ``position`` (``end`` ``None``: open-ended).

    Example::

        >>> from lightning_stages.schedule.stage_schedule import StageSchedule
        >>> gap_around(StageSchedule([{"start_step": 10, "end_step": 20}]), 25, 40)
        (20, 40)
    """
    start, end = 0, total
    for _, stage in _ordered(schedule):
        stage_end = schedule.end_of(stage, total)
        if stage_end is not None and stage_end <= position:
            start = max(start, stage_end)
        if stage.start > position:
            end = stage.start if end is None else min(end, stage.start)
            break
    return start, end


def uncovered_ranges(schedule: StageSchedule, total: Optional[int] = None) -> list[tuple[int, Optional[int]]]:
    """The ranges ``[start, end)`` no stage covers (``end`` ``None``: to the end); none without stages.

    Example::

        >>> from lightning_stages.schedule.stage_schedule import StageSchedule
        >>> StageSchedule([{"start_epoch": 2, "end_epoch": 4}]).uncovered_ranges(6)
        [(0, 2), (4, 6)]
    """
    if not schedule.stages:
        return []
    gaps: list[tuple[int, Optional[int]]] = []
    cursor: Optional[int] = 0
    for _, stage in _ordered(schedule):
        if cursor is not None and stage.start > cursor:
            gaps.append((cursor, stage.start if total is None else min(stage.start, total)))
        cursor = schedule.end_of(stage, total)
        if total is not None and cursor is not None and cursor >= total:
            cursor = None
    if cursor is not None and (total is None or cursor < total):
        gaps.append((cursor, total))
    return [(a, b) for a, b in gaps if b is None or a < b]


def timeline(schedule: StageSchedule, total: Optional[int] = None) -> list[ResolvedStage]:
    """The stage-level settings range by range (stages with their own values, and the gaps), in order.

    Example::

        >>> from lightning_stages.schedule.stage_schedule import StageSchedule
        >>> [r.label for r in StageSchedule([{"name": "a", "start_epoch": 1, "end_epoch": 2}]).timeline(3)]
        ['base (no stage)', 'a (1/1)', 'base (no stage)']
    """
    out: list[ResolvedStage] = []
    position = 0
    while total is None or position < total:
        resolved = schedule.stage_at(position, total)
        out.append(resolved)
        if resolved.end_epoch is None:
            break
        position = resolved.end_epoch
    return out


def first_distilling_label(schedule: StageSchedule) -> Optional[str]:
    """The first setting (by start) that needs teachers, as error messages name it; ``None`` if none.

    Example::

        >>> from lightning_stages.schedule.stage_schedule import StageSchedule
        >>> StageSchedule([{"start_epoch": 2, "distillation": True}]).first_distilling_label()
        "stage 0 ('stage_0')"
    """
    if schedule.base_distillation:
        return f"{BASE_STAGE_NAME} (distillation.enable)"
    for index, stage in _ordered(schedule):
        if stage.distillation:
            return stage_label(index, stage_name_of(stage, index))
    return None


def distilling_until(schedule: StageSchedule) -> float:
    """The exclusive end of the last distilling range: ``inf`` if open-ended, 0 if nothing distills.

    Example::

        >>> from lightning_stages.schedule.stage_schedule import StageSchedule
        >>> StageSchedule([{"start_epoch": 1, "end_epoch": 3, "distillation": True}], total_epochs=5).distilling_until()
        3.0
    """
    cached = schedule.__dict__.get("_distilling_until")  # computed once: a schedule is immutable, and the callback
    if cached is None:  # asks at every batch of a ramp
        ends = [r.end_epoch if r.distillation else _ramp_out_end(schedule, r) for r in schedule.timeline()]
        cached = schedule.__dict__["_distilling_until"] = max(
            (math.inf if end is None else float(end) for end in ends if end != _NOT_DISTILLING), default=0.0)
    return float(cached)


_NOT_DISTILLING = -1


def _ramp_out_end(schedule: StageSchedule, resolved: ResolvedStage) -> Optional[int]:
    """Where a stage that does not distill stops using the teachers: at the end of its ramp if the settings before
    it distill (the coefficient ramps down to 0 there, distilling until then), else never (``_NOT_DISTILLING``). A
    ``ramp_steps`` in an epoch schedule ends in an epoch the loader decides: the stage's end bounds it."""
    stage = schedule.stages[resolved.index] if resolved.index is not None else None
    if stage is None or stage.ramp_length is None or not schedule._before(stage, None).distillation:
        return _NOT_DISTILLING
    if schedule.unit == "epoch" and stage.ramp_steps is not None:
        return resolved.end_epoch
    ramp_end = stage.start + math.ceil(stage.ramp_length)
    return ramp_end if resolved.end_epoch is None else min(ramp_end, resolved.end_epoch)


def cut_short(schedule: StageSchedule, total: int) -> list[tuple[int, str, int]]:
    """``(index, name, end)`` of every stage that starts before ``total`` (epochs or steps) but ends after it.

    Example::

        >>> from lightning_stages.schedule.stage_schedule import StageSchedule
        >>> StageSchedule([{"start_epoch": 0, "end_epoch": 8}]).cut_short(5)
        [(0, 'stage_0', 8)]
    """
    ends = [(index, stage, schedule.end_of(stage)) for index, stage in enumerate(schedule.stages)]
    return [(index, stage_name_of(stage, index), end) for index, stage, end in ends
            if end is not None and end > total and stage.start < total]
