"""Checks of the adaptive-stage fields (issue 12), each a function returning ``list[StageProblem]``.

Kept apart from :mod:`.checks` (which calls :func:`adaptive_problems` for every stage) so that one concept lives in
one room: the fields that let a stage end on a plateau, restore its best weights and pick its training data.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_stages.errors import StageProblem
from lightning_stages.schedule.stage import Stage

__all__ = ["adaptive_problems"]


def adaptive_problems(stage: Stage, index: int) -> list[StageProblem]:
    """Problems of one stage's adaptive fields (types, ranges and the fields they need).

    Example::

        >>> [str(p) for p in adaptive_problems(Stage(name="ft", start_epoch=0, data=3), 1)]
        ["stage 1 ('ft'): `data` = 3: must be a string naming the stage's training data, not int"]
    """
    name: Optional[str] = stage.name if isinstance(stage.name, str) else None

    def problem(message: str, field_name: str, value: Any, hint: Optional[str] = None) -> StageProblem:
        return StageProblem(message, index=index, name=name, field=field_name, value=value, hint=hint)

    problems: list[StageProblem] = []
    if stage.data is not None and not isinstance(stage.data, str):
        problems.append(problem(f"must be a string naming the stage's training data, not {type(stage.data).__name__}",
                                "data", stage.data))
    return problems
