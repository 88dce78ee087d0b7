"""Where plateau-ended stages actually ended: the effective schedule, a pure function of the schedule and the
transitions a run took (``{stage index as written: the epoch after its last}``, or the optimizer step after its last
in a step schedule).

A stage that ends early hands over at once: the stage that started at its cap (its ``end_epoch``, or the run's
end) starts right after it instead, so consecutive stages stay consecutive and no uncovered gap opens. Every later
``end_epoch`` (``end_step``) keeps its absolute value, so the run's length does not change; the next stage simply runs longer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

from lightning_stages.errors import StageProblem
from lightning_stages.schedule.stage import Stage
from lightning_stages.schedule.stage_schedule import StageSchedule

__all__ = ["transition_problems", "with_transitions"]


def with_transitions(schedule: StageSchedule, transitions: Mapping[int, int]) -> StageSchedule:
    """The schedule as a run with these early ends trains it: each stage of ``transitions`` ends at its actual end,
    and the stage that started at its cap starts there instead. ``transitions`` must pass
    :func:`transition_problems`.

    Example::

        >>> s = StageSchedule([{"name": "kd", "start_epoch": 0, "end_epoch": 10, "monitor": "val/loss", "patience": 2},
        ...                    {"name": "ft", "start_epoch": 10, "end_epoch": 15}], total_epochs=20)
        >>> [(r.name, r.start_epoch, r.end_epoch) for r in with_transitions(s, {0: 6}).timeline()]
        [('kd', 0, 6), ('ft', 6, 15), ('base', 15, 20)]
        >>> s = StageSchedule([{"name": "kd", "start_step": 0, "end_step": 500, "monitor": "val/loss", "patience": 2},
        ...                    {"name": "ft", "start_step": 500}], total_steps=800)
        >>> [(r.name, r.start_epoch, r.end_epoch, r.unit) for r in with_transitions(s, {0: 320}).timeline()]
        [('kd', 0, 320, 'step'), ('ft', 320, 800, 'step')]
    """
    if not transitions:
        return schedule
    stages = list(schedule.stages)
    start, end_field = f"start_{schedule.unit}", f"end_{schedule.unit}"
    for index in sorted(transitions, key=lambda i: schedule.stages[i].start or 0):
        end = transitions[index]
        cap = schedule.end_of(schedule.stages[index])
        stages[index] = _moved(stages[index], end_field, end)
        for other, stage in enumerate(schedule.stages):
            if other != index and cap is not None and stage.start == cap:
                stages[other] = _moved(stages[other], start, end)
    return StageSchedule._checked_elsewhere(stages, schedule.loss_weights, schedule.distillation,
                                            schedule.lambda_coef, schedule.total_epochs, schedule.total_steps)


def _moved(stage: Stage, field: str, value: int) -> Stage:
    """``stage`` with its ``start_epoch``/``end_epoch``/``start_step``/``end_step`` (``field``) at ``value``."""
    changes: dict[str, Any] = {field: value}
    return replace(stage, **changes)


def transition_problems(schedule: StageSchedule, transitions: Any) -> list[StageProblem]:
    """Transitions (e.g. read from a checkpoint) that do not fit ``schedule``: unknown stages, stages that cannot end on
    a plateau, ends outside the stage.

    Example::

        >>> s = StageSchedule([{"start_epoch": 0, "end_epoch": 4, "monitor": "val/loss", "patience": 1}])
        >>> [str(p) for p in transition_problems(s, {0: 9, 3: 1})]
        ['stage 0: `transition` = 9: is not inside the stage [0, 4)', 'stage 3: `transition` = 1: there is no such stage']
    """
    if not isinstance(transitions, Mapping):
        return [StageProblem(f"must map stage indices to {schedule.unit}s", field="transitions", value=transitions)]
    starts = _starts(schedule, transitions)
    problems = []
    for index, end in transitions.items():
        stage: Optional[Stage] = schedule.stages[index] if isinstance(index, int) and 0 <= index < len(
            schedule.stages) else None
        if stage is None:
            problems.append(StageProblem("there is no such stage", index=index, field="transition", value=end))
            continue
        cap, start = schedule.end_of(stage), starts[index]
        if not stage.ends_on_plateau:
            problems.append(StageProblem("the stage does not end on a plateau (no `monitor` and `patience`)",
                                         index=index, name=stage.name, field="transition", value=end))
        elif not (isinstance(end, int) and start < end and (cap is None or end <= cap)):
            problems.append(StageProblem(f"is not inside the stage [{start}, {cap if cap is not None else 'end'})",
                                         index=index, name=stage.name, field="transition", value=end))
    return problems


def _starts(schedule: StageSchedule, transitions: Mapping[Any, Any]) -> dict[int, int]:
    """Each stage's start once the earlier stages' transitions moved it (as :func:`with_transitions` moves it): a
    stage that started at an earlier plateau stage's cap starts at that stage's actual end."""
    starts = {index: stage.start or 0 for index, stage in enumerate(schedule.stages)}
    known = [i for i in transitions if isinstance(i, int) and not isinstance(i, bool) and i in starts
             and isinstance(transitions[i], int)]
    for index in sorted(known, key=lambda i: schedule.stages[i].start or 0):
        cap = schedule.end_of(schedule.stages[index])
        for other, stage in enumerate(schedule.stages):
            if other != index and cap is not None and stage.start == cap:
                starts[other] = transitions[index]
    return starts
