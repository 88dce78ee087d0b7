"""The one error type of the plugin and the helpers that build its messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["StageConfigError", "StageProblem", "did_you_mean"]


@dataclass(frozen=True)
class StageProblem:
    """One problem found in a schedule or in its use.

    Args:
        message: what is wrong, in a few words.
        index: position of the stage in ``stage_schedule`` (``None`` for the base settings or the file).
        name: the stage's ``name``, if it has one.
        field: the field that is wrong (e.g. ``"lambda_coef"`` or ``"loss_weights.focal"``).
        value: the offending value.
        hint: an optional "did you mean" or how to fix it.

    Example::

        >>> str(StageProblem("must be >= 0", index=1, name="finetune", field="lambda_coef", value=-1.0))
        "stage 1 ('finetune'): `lambda_coef` = -1.0: must be >= 0"
    """

    message: str
    index: Optional[int] = None
    name: Optional[str] = None
    field: Optional[str] = None
    value: Any = None
    hint: Optional[str] = None

    @property
    def where(self) -> str:
        """The stage this problem belongs to, as the user would name it."""
        if self.index is None:
            return self.name if self.name is not None else "schedule"
        return f"stage {self.index} ({self.name!r})" if self.name is not None else f"stage {self.index}"

    def __str__(self) -> str:
        text = self.where
        if self.field is not None:
            text += f": `{self.field}` = {self.value!r}"
        text += f": {self.message}"
        if self.hint:
            text += f"; {self.hint}"
        return text


class StageConfigError(ValueError):
    """Every problem of a stage schedule, raised together before the first training batch.

    Args:
        problems: the problems found; each names the stage (index and name), the field and the value.

    Example::

        >>> err = StageConfigError([StageProblem("must be >= 0", index=0, field="lambda_coef", value=-1)])
        >>> print(err)
        1 problem in the stage schedule:
          - stage 0: `lambda_coef` = -1: must be >= 0
    """

    def __init__(self, problems: Iterable[StageProblem] | StageProblem | str) -> None:
        if isinstance(problems, (StageProblem, str)):
            problems = [problems]
        self.problems: tuple[StageProblem, ...] = tuple(
            p if isinstance(p, StageProblem) else StageProblem(str(p)) for p in problems
        )
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the stage schedule:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuild from the problems, not from the message (e.g. when a worker process sends the error back)
        return type(self), (self.problems,)


def did_you_mean(word: str, candidates: Sequence[str]) -> Optional[str]:
    """Return ``"did you mean `x`?"`` for the closest candidate to ``word``, or ``None``.

    Example::

        >>> did_you_mean("lamda_coef", ["lambda_coef", "loss_weights"])
        'did you mean `lambda_coef`?'
        >>> did_you_mean("zzz", ["bce"]) is None
        True
    """
    matches = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f"did you mean `{matches[0]}`?" if matches else None
