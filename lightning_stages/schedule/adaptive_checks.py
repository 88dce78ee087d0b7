"""Checks of the adaptive-stage fields (issue 12), each a function returning ``list[StageProblem]``.

Kept apart from :mod:`.checks` (which calls :func:`adaptive_problems` for every stage) so that one concept lives in
one room: the fields that let a stage end on a plateau, restore its best weights and pick its training data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

from lightning_stages.errors import StageProblem, did_you_mean
from lightning_stages.schedule.stage import Stage

__all__ = ["MODES", "adaptive_problems", "min_epochs_problems"]

MODES = ("min", "max")
# the fields that mean nothing without `monitor`
_NEED_MONITOR = ("mode", "patience", "min_delta", "min_epochs", "restore_best")


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
        >>> print(adaptive_problems(Stage(start_step=0, data="labelled"), 0)[0])  # doctest: +ELLIPSIS
        stage 0: `data` = 'labelled': needs an epoch stage (`start_epoch`/`end_epoch`): ...
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
    if stage.min_delta is not None:
        delta = stage.min_delta
        if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and math.isfinite(delta)):
            problems.append(problem("must be a finite number >= 0", "min_delta", delta))
        elif delta < 0:
            problems.append(problem("must be >= 0", "min_delta", delta))
    if stage.min_epochs is not None:
        if not (_is_int(stage.min_epochs) and stage.min_epochs >= 1):
            problems.append(problem("must be an integer >= 1", "min_epochs", stage.min_epochs))
        elif stage.patience is None:
            problems.append(problem("has no effect without `patience`: only a plateau can end a stage early",
                                    "min_epochs", stage.min_epochs))
        elif _is_int(stage.start_epoch) and _is_int(stage.end_epoch):
            problems += min_epochs_problems([(index, stage)], stage.end_epoch)
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
    if stage.start_step is not None:  # plateaus, best weights and data are decided at epoch ends
        problems += [problem("needs an epoch stage (`start_epoch`/`end_epoch`): a plateau, the best weights and the "
                             "training data are decided where an epoch ends, not at an optimizer step", key,
                             getattr(stage, key), "give this stage in epochs, or leave the field out")
                     for key in ("monitor", "patience", "min_epochs", "restore_best", "data")
                     if getattr(stage, key) is not None]
    return problems


def min_epochs_problems(indexed: Iterable[tuple[int, Stage]], total_epochs: Optional[int]) -> list[StageProblem]:
    """Stages whose ``min_epochs`` is longer than the stage (its ``end_epoch``, else ``total_epochs``).

    Example::

        >>> stage = Stage(name="kd", start_epoch=2, monitor="val/loss", patience=2, min_epochs=5)
        >>> print(min_epochs_problems([(0, stage)], 6)[0])
        stage 0 ('kd'): `min_epochs` = 5: is longer than the stage, which has 4 epochs ([2, 6))
    """
    problems = []
    for index, stage in indexed:
        end = stage.end_epoch if stage.end_epoch is not None else total_epochs
        min_epochs = stage.min_epochs
        start = stage.start_epoch
        if not (isinstance(min_epochs, int) and isinstance(start, int) and _is_int(start) and isinstance(end, int)):
            continue
        length = end - start
        if length > 0 and min_epochs > length:
            problems.append(StageProblem(
                f"is longer than the stage, which has {length} epoch{'s' if length != 1 else ''} "
                f"([{stage.start_epoch}, {end}))", index=index, name=stage.name, field="min_epochs",
                value=min_epochs))
    return problems
