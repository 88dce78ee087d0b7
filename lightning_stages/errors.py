"""The plugin's two error types and the helpers that build their messages.

:class:`StageConfigError` is every problem of a schedule or a config; :class:`DistillationStepError` (its subclass, so
``except StageConfigError`` still catches it) is a problem found at a training step.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "DistillationStepError", "StageConfigError", "StageProblem", "closest_names", "did_you_mean", "flag_problem",
    "printable", "short_repr", "stage_label",
]

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 6


def short_repr(value: Any) -> str:
    """``repr(value)`` shortened (``reprlib``), so that no value, however large or deep, can blow up a message.

    Example::

        >>> short_repr(list(range(100))), short_repr("x" * 200)[:12], short_repr(10 ** 5000)
        ('[0, 1, 2, 3, 4, 5, ...]', "'xxxxxxxxxxx", '<an integer of more than 4999 digits>')
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of more than {int((value.bit_length() - 1) * 0.30103)} digits>"  # log10(2) = 0.30103
    try:
        return _REPR.repr(value)
    except Exception:  # a value whose repr fails (or refuses, as a huge int does) is named by its type
        return f"<{type(value).__name__}>"


def printable(text: Any, limit: int = 120) -> str:
    r"""``text`` with control characters escaped as ``repr`` would (``\n``, ``\x1b``), shortened to ``limit``
    characters: a name or key from a config can neither add a line nor reach the terminal as an escape sequence.

    Example::

        >>> printable("warm\nup\x1b[31m")
        'warm\\nup\\x1b[31m'
        >>> printable(b"caf\xe9".decode("utf-8", "surrogateescape"))  # a file name that is not UTF-8
        'caf\\xe9'
    """
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text if text.isprintable() else "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(character: str) -> str:
    r"""``repr``'s escape of a character; a byte that was not UTF-8 in a file name (Python's surrogate escape
    ``\udce9``) is shown as that byte, ``\xe9``."""
    if "\udc80" <= character <= "\udcff":
        return f"\\x{ord(character) - 0xDC00:02x}"
    return repr(character)[1:-1]


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
        return stage_label(self.index, self.name)

    def __str__(self) -> str:
        text = self.where
        if self.field is not None:
            text += f": `{printable(self.field)}` = {short_repr(self.value)}"
        # the message and hint may quote config text (a key, a class path, a parser's error): escaped, never raw
        text += f": {printable(self.message, 2000)}"
        if self.hint:
            text += f"; {printable(self.hint, 2000)}"
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
        items: Iterable[StageProblem | str] = [problems] if isinstance(problems, (StageProblem, str)) else problems
        self.problems: tuple[StageProblem, ...] = tuple(
            p if isinstance(p, StageProblem) else StageProblem(str(p)) for p in items
        )
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} {self._context()}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))

    def _context(self) -> str:
        return "in the stage schedule"

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuild from the problems, not from the message (e.g. when a worker process sends the error back)
        return type(self), (self.problems,)


class DistillationStepError(StageConfigError):
    """A problem found at a training step, not in the schedule: a non-finite loss, features that were not captured or
    do not match, a teacher cache that does not fit the batch.

    A subclass of :class:`StageConfigError`, so ``except StageConfigError`` still catches it.

    Args:
        problems: the problems found.
        stage: the name of the stage in force, named in the header.
        when: the step, as the header says it (``"the first step"`` by default).

    Example::

        >>> err = DistillationStepError(
        ...     [StageProblem("is not finite", name="stage 'kd'", field="distill_losses.kd", value=float("nan"))],
        ...     stage="kd")
        >>> print(err)
        1 problem at the first step of stage 'kd':
          - stage 'kd': `distill_losses.kd` = nan: is not finite
        >>> isinstance(err, StageConfigError)
        True
    """

    def __init__(
        self,
        problems: Iterable[StageProblem] | StageProblem | str,
        stage: Optional[str] = None,
        when: str = "the first step",
    ) -> None:
        self.stage = stage
        self.when = when
        super().__init__(problems)

    def _context(self) -> str:
        where = f"stage {short_repr(self.stage)}" if self.stage is not None else "training"
        return f"at {self.when} of {where}"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.problems, self.stage, self.when)


def stage_label(index: Optional[int], name: Optional[str]) -> str:
    """A stage as every message names it: ``stage 1 ('finetune')``, ``stage 1``, or a bare name for the base settings.

    Example::

        >>> stage_label(1, "finetune"), stage_label(1, None), stage_label(None, "base"), stage_label(None, None)
        ("stage 1 ('finetune')", 'stage 1', 'base', 'schedule')
    """
    if index is None:
        return printable(name) if name is not None else "schedule"
    return f"stage {index} ({short_repr(name)})" if name is not None else f"stage {index}"


def flag_problem(value: Any, field: str, name: str) -> Optional[StageProblem]:
    """What is wrong with an argument that must be ``True`` or ``False`` (a numpy bool counts as one).

    Example::

        >>> print(flag_problem("no", "verbose", "StageScheduleCallback"))
        StageScheduleCallback: `verbose` = 'no': must be true or false, not str
    """
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return None
    return StageProblem(f"must be true or false, not {type(value).__name__}", name=name, field=field, value=value)


def did_you_mean(word: str, candidates: Sequence[str]) -> Optional[str]:
    """Return ``"did you mean `x`?"`` for the closest candidate to ``word``, or ``None``.

    Example::

        >>> did_you_mean("lamda_coef", ["lambda_coef", "loss_weights"])
        'did you mean `lambda_coef`?'
        >>> did_you_mean("zzz", ["bce"]) is None
        True
    """
    matches = closest_names(word, candidates, n=1, cutoff=0.6)
    return f"did you mean `{matches[0]}`?" if matches else None


def closest_names(word: str, candidates: Sequence[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The up to ``n`` candidates closest to ``word``, best first (``difflib``'s ratio at least ``cutoff``).

    Example::

        >>> closest_names("encoder.layer3", ["encoder.layer1", "encoder.layer2", "decoder"], n=2, cutoff=0.4)
        ['encoder.layer2', 'encoder.layer1']
    """
    return difflib.get_close_matches(str(word), [str(c) for c in candidates], n=n, cutoff=cutoff)
