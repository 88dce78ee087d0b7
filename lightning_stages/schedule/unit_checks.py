"""Checks of the step and ramp fields (``start_step``, ``end_step``, ``ramp_epochs``, ``ramp_steps``,
``ramp_shape``), each a function returning ``list[StageProblem]`` (empty: nothing wrong).

A stage counts in epochs or in optimizer steps, and one schedule uses one unit; stages of one unit do not overlap
(:func:`overlap_problems`). A ramp is a finite length > 0 that fits in its stage.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any, Optional

from lightning_stages.errors import StageProblem, did_you_mean, short_repr, stage_label
from lightning_stages.schedule.stage import TOO_LARGE, Stage, too_large

if TYPE_CHECKING:
    from lightning_stages.schedule.stage_schedule import StageSchedule

__all__ = ["RAMP_SHAPES", "epoch_ramp_problems", "mixed_unit_problems", "overlap_problems", "ramp_length_problems",
           "step_field_problems"]

RAMP_SHAPES = ("linear", "cosine")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def step_field_problems(stage: Stage, index: int) -> list[StageProblem]:
    """Check one stage's step and ramp fields on their own (types, ranges, one unit, a known ramp shape).

    Example::

        >>> print(step_field_problems(Stage(start_step=0, ramp_shape="cosin"), 0)[0])
        stage 0: `ramp_shape` = 'cosin': is not a ramp shape; did you mean `cosine`?
        >>> [str(p) for p in step_field_problems(Stage(start_epoch=0, start_step=0), 1)]
        ['stage 1: `start_step` = 0: a stage counts in epochs or in steps, not both; give `start_epoch` or `start_step`']
    """
    name = stage.name if isinstance(stage.name, str) else None
    problems: list[StageProblem] = []

    def problem(message: str, field: str, value: Any, hint: Optional[str] = None) -> None:
        problems.append(StageProblem(message, index=index, name=name, field=field, value=value, hint=hint))

    for field in ("start_step", "end_step"):
        value = getattr(stage, field)
        if value is not None and not _is_int(value):
            problem(f"must be an integer, not {type(value).__name__}", field, value)
        elif value is not None and value < 0:
            problem("must be >= 0", field, value)
        elif too_large(value):
            problem(TOO_LARGE, field, value)
    if stage.unit == "step":
        both = [f for f in ("start_epoch", "end_epoch") if getattr(stage, f) is not None]
        if both:
            field = "start_step" if stage.start_step is not None else "end_step"
            problem("a stage counts in epochs or in steps, not both", field, getattr(stage, field),
                    f"give `{both[0]}` or `{both[0].replace('epoch', 'step')}`")
        start, end = stage.start_step, stage.end_step
        if _is_int(start) and isinstance(start, int) and isinstance(end, int) and end <= start:
            problem(f"must be greater than `start_step` ({start})", "end_step", end)
    ramps = [f for f in ("ramp_epochs", "ramp_steps") if getattr(stage, f) is not None]
    if len(ramps) == 2:
        problem("give `ramp_epochs` or `ramp_steps`, not both", "ramp_steps", stage.ramp_steps)
    if stage.ramp_epochs is not None:
        value = stage.ramp_epochs
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            problem(f"must be a number, not {type(value).__name__}", "ramp_epochs", value)
        elif too_large(value):
            problem(TOO_LARGE, "ramp_epochs", value)
        elif not math.isfinite(value) or value <= 0:
            problem("must be a finite number > 0", "ramp_epochs", value)
        elif stage.unit == "step":
            problem("is not for a stage in steps", "ramp_epochs", value, "use `ramp_steps`")
    if stage.ramp_steps is not None:
        value = stage.ramp_steps
        if not _is_int(value):
            problem(f"must be an integer, not {type(value).__name__}", "ramp_steps", value)
        elif value <= 0:
            problem("must be an integer > 0", "ramp_steps", value)
        elif too_large(value):  # `show` writes it as a float
            problem(TOO_LARGE, "ramp_steps", value)
    if stage.ramp_shape is not None:
        if not isinstance(stage.ramp_shape, str) or stage.ramp_shape not in RAMP_SHAPES:
            problem("is not a ramp shape", "ramp_shape", stage.ramp_shape,
                    did_you_mean(str(stage.ramp_shape), RAMP_SHAPES) or f"the shapes are: {', '.join(RAMP_SHAPES)}")
        elif not ramps:
            problem("needs `ramp_epochs` or `ramp_steps`", "ramp_shape", stage.ramp_shape)
    return problems


def mixed_unit_problems(indexed: Iterable[tuple[int, Stage]]) -> list[StageProblem]:
    """One schedule uses one unit: every stage whose unit differs from the first stage's (as written).

    Example::

        >>> a, b = Stage(name="a", start_epoch=0, end_epoch=2), Stage(name="b", start_step=50)
        >>> print(mixed_unit_problems([(0, a), (1, b)])[0])
        stage 1 ('b'): `start_step` = 50: this schedule counts in epochs (stage 0 ('a') gives `start_epoch`); one schedule uses one unit
    """
    problems: list[StageProblem] = []
    first: Optional[tuple[int, Stage]] = None
    for index, stage in indexed:
        if first is None:
            first = (index, stage)
        elif stage.unit != first[1].unit:
            where = stage_label(first[0], first[1].name)
            field = f"start_{stage.unit}" if stage.start is not None else f"end_{stage.unit}"
            problems.append(StageProblem(
                f"this schedule counts in {first[1].unit}s ({where} gives `start_{first[1].unit}`); one schedule uses "
                "one unit", index=index, name=stage.name, field=field, value=getattr(stage, field)))
    return problems


def ramp_length_problems(indexed: Iterable[tuple[int, Stage]], total: Optional[int] = None,
                         steps_per_epoch: Optional[int] = None) -> list[StageProblem]:
    """Ramps longer than their stage. A stage without its own end ends at ``total`` (epochs or steps, in its unit);
    ``ramp_steps`` of an epoch stage is measured with ``steps_per_epoch`` (skipped when it is ``None``).

    Example::

        >>> print(ramp_length_problems([(0, Stage(start_epoch=2, end_epoch=4, ramp_epochs=3))])[0])
        stage 0: `ramp_epochs` = 3: is longer than the stage (2 epochs, [2, 4))
        >>> print(ramp_length_problems([(1, Stage(start_epoch=0, ramp_steps=9))], total=2, steps_per_epoch=4)[0])
        stage 1: `ramp_steps` = 9: is longer than the stage (8 steps: 2 epochs of 4 optimizer steps)
    """
    problems: list[StageProblem] = []
    for index, stage in indexed:
        end = stage.end if stage.end is not None else total
        if stage.ramp_length is None or end is None or not _is_int(stage.start) or not _is_int(end):
            continue
        length = end - stage.start
        field = "ramp_steps" if stage.ramp_steps is not None else "ramp_epochs"
        if stage.unit == "epoch" and field == "ramp_steps":
            if steps_per_epoch is None:
                continue
            size = f"{length * steps_per_epoch} steps: {length} epochs of {steps_per_epoch} optimizer steps"
            length *= steps_per_epoch
        else:
            size = f"{length} {stage.unit}s, [{stage.start}, {end})"
        if isinstance(stage.ramp_length, (int, float)) and stage.ramp_length > length:
            problems.append(StageProblem(f"is longer than the stage ({size})", index=index, name=stage.name,
                                         field=field, value=stage.ramp_length))
    return problems


def epoch_ramp_problems(schedule: StageSchedule, batches_per_epoch: float, accumulate_grad_batches: int = 1,
                        stages: Optional[Collection[Optional[int]]] = None) -> list[StageProblem]:
    """The ramps of an epoch schedule (of the stages at the indices ``stages`` only, if given), once the batches per
    epoch of their loader are known (the callback checks each stage at its first batch, against its own loader, as
    its own `data` may have another number of batches): they need a finite number of batches, and ``ramp_steps`` must
    fit in its stage.

    Example::

        >>> from lightning_stages.schedule.stage_schedule import StageSchedule
        >>> s = StageSchedule([{"name": "ft", "start_epoch": 0, "end_epoch": 2, "ramp_steps": 5}])
        >>> print(epoch_ramp_problems(s, 4, accumulate_grad_batches=2)[0])
        stage 0 ('ft'): `ramp_steps` = 5: is longer than the stage (4 steps: 2 epochs of 2 optimizer steps)
        >>> print(epoch_ramp_problems(s, float("inf"))[0])
        stage 0 ('ft'): `ramp_steps` = 5: needs the number of batches per epoch, but the training loader has no length; give the loader a length, or count the schedule in steps (`start_step`, `ramp_steps`)
    """
    ramped = [(i, s) for i, s in enumerate(schedule.stages) if s.ramp_length is not None and s.unit == "epoch"
              and (stages is None or i in stages)]
    if not ramped:  # nothing to check (and a loader without a length needs none)
        return []
    if not math.isfinite(batches_per_epoch):
        return [StageProblem("needs the number of batches per epoch, but the training loader has no length",
                             index=i, name=s.name, field="ramp_steps" if s.ramp_steps is not None else "ramp_epochs",
                             value=s.ramp_length,
                             hint="give the loader a length, or count the schedule in steps (`start_step`, `ramp_steps`)")
                for i, s in ramped]
    return ramp_length_problems(ramped, schedule.total_epochs, math.ceil(batches_per_epoch / accumulate_grad_batches))


def overlap_problems(ranged: Iterable[tuple[int, Stage]]) -> list[StageProblem]:
    """Stages (``(index as written, stage)``, epoch ranges well-formed) whose epochs overlap an earlier-starting one.

    Each stage is compared with every earlier-starting stage still running, not only its neighbour:
    ``[0, 10), [2, 4), [5, 8)`` has two overlaps. A stage names at most :data:`_OVERLAPS_NAMED` of them, and at most
    :data:`_OVERLAPS_LISTED` problems are listed (then how many more): thousands of stages that all overlap give a
    readable message, in time linear in their number.

    Example::

        >>> a, b = Stage(name="a", start_epoch=0, end_epoch=4), Stage(start_epoch=2)
        >>> print(overlap_problems([(0, a), (1, b)])[0])
        stage 1: `start_epoch` = 2: overlaps stage 0 ('a') which covers epochs [0, 4)
    """
    problems: list[StageProblem] = []
    more = 0
    running: dict[str, tuple[list[tuple[float, int]], dict[int, tuple[int, Stage]]]] = {}  # per unit: ends, stages
    ordered = sorted(((i, s) for i, s in ranged if s.start is not None), key=lambda item: item[1].start)
    for pos, (cur, b) in enumerate(ordered):
        ends, active = running.setdefault(b.unit, ([], {}))  # a heap of the running stages' ends; them, by start
        while ends and ends[0][0] <= b.start:
            active.pop(heapq.heappop(ends)[1], None)
        for count, (prev, a) in enumerate(active.values()):
            if count == _OVERLAPS_NAMED or len(problems) == _OVERLAPS_LISTED:
                more += len(active) - count
                break
            a_range = f"[{short_repr(a.start)}, {short_repr(a.end) if a.end is not None else 'end'})"
            problems.append(StageProblem(
                f"overlaps {stage_label(prev, a.name if a.name else None)} which covers {a.unit}s {a_range}",
                index=cur, name=b.name, field=f"start_{b.unit}", value=b.start,
                hint=None if a.end is not None else f"a stage without `end_{a.unit}` runs to the last {a.unit}"))
        heapq.heappush(ends, (b.end if b.end is not None else math.inf, pos))
        active[pos] = (cur, b)
    if more:
        problems.append(StageProblem(f"{more} more overlaps of one stage with another, not listed", name="schedule"))
    return problems


#: the most overlapped stages one stage's problems name, and the most overlap problems listed in all
_OVERLAPS_NAMED, _OVERLAPS_LISTED = 5, 100
