"""Checks of the adaptive-stage fields (issue 12), each a function returning ``list[StageProblem]``.

Kept apart from :mod:`.checks` (which calls :func:`adaptive_problems` for every stage) so that one concept lives in
one room: the fields that let a stage end on a plateau, restore its best weights and pick its training data.
:func:`min_length_problems` needs the run's length and is called when the schedule is bound
(:func:`~lightning_stages.schedule.bind.bind_schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

from lightning_stages.errors import StageProblem, did_you_mean
from lightning_stages.schedule.stage import TOO_LARGE, Stage, too_large

__all__ = ["MODES", "adaptive_problems", "min_length_problems"]

MODES = ("min", "max")
# the fields that mean nothing without `monitor`
_NEED_MONITOR = ("mode", "patience", "min_delta", "min_epochs", "min_steps", "restore_best")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def adaptive_problems(stage: Stage, index: int) -> list[StageProblem]:
    """Problems of one stage's adaptive fields (types, ranges and the fields they need).

    Example::

        >>> [str(p) for p in adaptive_problems(Stage(name="ft", start_epoch=0, data=3), 1)]
        ["stage 1 ('ft'): `data` = 3: must be a string naming the stage's training data, not int"]
        >>> print(adaptive_problems(Stage(start_epoch=0, monitor="val/loss", mode="mim"), 0)[0])
        stage 0: `mode` = 'mim': must be 'min' or 'max'; did you mean `min`?
        >>> print(adaptive_problems(Stage(start_epoch=0, patience=3), 0)[0])
        stage 0: `patience` = 3: needs `monitor`, the logged metric the stage watches; e.g. "monitor": "val/loss"
        >>> print(adaptive_problems(Stage(start_step=0, monitor="val/loss", patience=2, min_epochs=3), 0)[0])
        stage 0: `min_epochs` = 3: counts epochs, but this stage counts optimizer steps; give `min_steps`
    """
    name: Optional[str] = stage.name if isinstance(stage.name, str) else None

    def problem(message: str, field_name: str, value: Any, hint: Optional[str] = None) -> StageProblem:
        return StageProblem(message, index=index, name=name, field=field_name, value=value, hint=hint)

    problems: list[StageProblem] = []
    if stage.monitor is not None and not (isinstance(stage.monitor, str) and stage.monitor):
        problems.append(problem("must be the name of a logged metric (a non-empty string)", "monitor", stage.monitor))
    if stage.mode is not None and stage.mode not in MODES:
        hint = did_you_mean(stage.mode, MODES) if isinstance(stage.mode, str) else None
        problems.append(problem("must be 'min' or 'max'", "mode", stage.mode, hint))
    if stage.patience is not None and not (_is_int(stage.patience) and stage.patience >= 1):
        problems.append(problem("must be an integer >= 1", "patience", stage.patience))
    elif too_large(stage.patience):
        problems.append(problem(TOO_LARGE, "patience", stage.patience))
    if stage.min_delta is not None:
        delta = stage.min_delta
        if too_large(delta):
            problems.append(problem(TOO_LARGE, "min_delta", delta))
        elif not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and math.isfinite(delta)):
            problems.append(problem("must be a finite number >= 0", "min_delta", delta))
        elif delta < 0:
            problems.append(problem("must be >= 0", "min_delta", delta))
    problems += _min_length_problems(stage, index, problem)
    if stage.restore_best is not None and not isinstance(stage.restore_best, bool):
        problems.append(problem(f"must be true or false, not {type(stage.restore_best).__name__}", "restore_best",
                                stage.restore_best))
    if stage.data is not None and not isinstance(stage.data, str):
        problems.append(problem(f"must be a string naming the stage's training data, not {type(stage.data).__name__}",
                                "data", stage.data))
    if stage.monitor is None:
        problems += [problem("needs `monitor`, the logged metric the stage watches", key, getattr(stage, key),
                             'e.g. "monitor": "val/loss"')
                     for key in _NEED_MONITOR if getattr(stage, key) is not None]
    return problems


def _min_length_problems(stage: Stage, index: int, problem: Any) -> list[StageProblem]:
    """``min_epochs`` (an int >= 1, epoch stages) and ``min_steps`` (an int >= 0, step stages) on their own."""
    problems = []
    for key, unit, least in (("min_epochs", "epoch", 1), ("min_steps", "step", 0)):
        value = getattr(stage, key)
        if value is None:
            continue
        other = "min_steps" if unit == "epoch" else "min_epochs"
        if not (_is_int(value) and value >= least):
            problems.append(problem(f"must be an integer >= {least}", key, value))
        elif too_large(value):
            problems.append(problem(TOO_LARGE, key, value))
        elif stage.unit != unit:
            counts = "optimizer steps" if stage.unit == "step" else "epochs"
            problems.append(problem(f"counts {unit}s, but this stage counts {counts}; give `{other}`", key, value))
        elif stage.patience is None:
            problems.append(problem("has no effect without `patience`: only a plateau can end a stage early", key, value))
        elif _is_int(stage.start) and _is_int(stage.end):
            problems += min_length_problems([(index, stage)], stage.end)
    return problems


def min_length_problems(indexed: Iterable[tuple[int, Stage]], total: Optional[int]) -> list[StageProblem]:
    """Stages whose ``min_epochs`` (``min_steps``) is longer than the stage: its ``end_epoch`` (``end_step``), else
    ``total`` (the run's epochs or steps, in the stages' unit).

    Example::

        >>> stage = Stage(name="kd", start_epoch=2, monitor="val/loss", patience=2, min_epochs=5)
        >>> print(min_length_problems([(0, stage)], 6)[0])
        stage 0 ('kd'): `min_epochs` = 5: is longer than the stage, which has 4 epochs ([2, 6))
        >>> stage = Stage(name="kd", start_step=100, monitor="val/loss", patience=2, min_steps=500)
        >>> print(min_length_problems([(0, stage)], 300)[0])
        stage 0 ('kd'): `min_steps` = 500: is longer than the stage, which has 200 steps ([100, 300))
    """
    problems = []
    for index, stage in indexed:
        key = "min_steps" if stage.unit == "step" else "min_epochs"
        least, start = getattr(stage, key), stage.start
        end = stage.end if stage.end is not None else total
        if not (_is_int(least) and _is_int(start) and _is_int(end)):
            continue
        length = end - start
        if length > 0 and least > length:
            problems.append(StageProblem(
                f"is longer than the stage, which has {length} {stage.unit}{'s' if length != 1 else ''} "
                f"([{start}, {end}))", index=index, name=stage.name, field=key, value=least))
    return problems
