"""A stage of the schedule as the user writes it, and as it resolves for one epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from lightning_stages.errors import StageProblem, did_you_mean

__all__ = ["ResolvedStage", "Stage", "parse_stage", "stage_problems"]


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One consecutive epoch range of training, with its own distillation and loss settings.

    Fields left out inherit the schedule's base settings: ``end_epoch`` defaults to the total epochs,
    ``distillation`` to the base flag, ``lambda_coef`` to the base coefficient, and every task loss
    that ``loss_weights`` does not name keeps its base weight.

    Args:
        name: optional description, shown in logs. Defaults to ``"stage_<index>"``.
        start_epoch: first epoch of the stage (inclusive).
        end_epoch: first epoch after the stage (exclusive). ``None`` means the total epochs.
        distillation: whether the teacher-student loss is on in this stage. ``None`` inherits the base flag.
        lambda_coef: scales the sum of all distillation losses. ``None`` inherits the base value.
        loss_weights: weights of task losses (e.g. ``bce``, ``focal``, ``dice``, ``iou``, ``cls``) for this stage.

    Example::

        >>> Stage(name="distill_only", start_epoch=0, end_epoch=100, distillation=True, lambda_coef=1.0,
        ...       loss_weights={"bce": 0, "focal": 0})
        Stage(name='distill_only', start_epoch=0, end_epoch=100, distillation=True, lambda_coef=1.0, loss_weights={'bce': 0, 'focal': 0})
    """

    name: Optional[str] = None
    start_epoch: int
    end_epoch: Optional[int] = None
    distillation: Optional[bool] = None
    lambda_coef: Optional[float] = None
    loss_weights: Optional[dict[str, float]] = None

    def __post_init__(self) -> None:
        # keep a private copy: never share (or later mutate) the caller's dict
        if isinstance(self.loss_weights, Mapping):
            object.__setattr__(self, "loss_weights", dict(self.loss_weights))

    def to_dict(self) -> dict[str, Any]:
        """The stage as a plain mapping in the config format (omitted fields left out).

        Example::

            >>> Stage(start_epoch=3, distillation=True).to_dict()
            {'start_epoch': 3, 'distillation': True}
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out


STAGE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Stage))


@dataclass(frozen=True)
class ResolvedStage:
    """The settings in force for one epoch: a stage with every base value filled in.

    Args:
        name: the stage's name, or ``"base"`` where no stage covers the epoch.
        index: the stage's position in ``stage_schedule`` as written, or ``None`` for the base settings.
        position: 1-based order of the stage by start epoch (``None`` for the base settings).
        num_stages: how many stages the schedule has.
        start_epoch: first epoch of the range (inclusive).
        end_epoch: first epoch after the range (exclusive), ``None`` if open-ended.
        distillation: whether the distillation loss is on.
        lambda_coef: the distillation coefficient.
        loss_weights: the complete weight of every task loss.
    """

    name: str
    index: Optional[int]
    position: Optional[int]
    num_stages: int
    start_epoch: int
    end_epoch: Optional[int]
    distillation: bool
    lambda_coef: float
    loss_weights: dict[str, float] = field(default_factory=dict)

    @property
    def is_base(self) -> bool:
        """Whether no stage covers the epoch and the base settings apply."""
        return self.index is None

    @property
    def label(self) -> str:
        """Name and position, e.g. ``"finetune_only (2/2)"``."""
        if self.is_base:
            return f"{self.name} (no stage)"
        return f"{self.name} ({self.position}/{self.num_stages})"

    def same_settings(self, other: ResolvedStage) -> bool:
        """Whether two resolved stages apply the same values (ignoring the epoch range)."""
        return (
            self.name == other.name
            and self.index == other.index
            and self.distillation == other.distillation
            and self.lambda_coef == other.lambda_coef
            and self.loss_weights == other.loss_weights
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_weight(value: Any, problem: Any, field_name: str) -> list[StageProblem]:
    if not _is_real(value):
        return [problem(f"must be a number, not {type(value).__name__}", field_name, value)]
    if not math.isfinite(value):
        return [problem("must be finite", field_name, value)]
    if value < 0:
        return [problem("must be >= 0", field_name, value)]
    return []


def stage_problems(stage: Stage, index: int) -> list[StageProblem]:
    """Check one stage's own fields (types and ranges). Problems between stages are the schedule's.

    Example::

        >>> [str(p) for p in stage_problems(Stage(start_epoch=5, end_epoch=2), 0)]
        ['stage 0: `end_epoch` = 2: must be greater than `start_epoch` (5)']
    """
    name = stage.name if isinstance(stage.name, str) else None

    def problem(message: str, field_name: str, value: Any, hint: Optional[str] = None) -> StageProblem:
        return StageProblem(message, index=index, name=name, field=field_name, value=value, hint=hint)

    problems: list[StageProblem] = []
    if stage.name is not None and not isinstance(stage.name, str):
        problems.append(problem(f"must be a string, not {type(stage.name).__name__}", "name", stage.name))
    if not _is_int(stage.start_epoch):
        problems.append(
            problem(f"must be an integer, not {type(stage.start_epoch).__name__}", "start_epoch", stage.start_epoch)
        )
    elif stage.start_epoch < 0:
        problems.append(problem("must be >= 0", "start_epoch", stage.start_epoch))
    if stage.end_epoch is not None:
        if not _is_int(stage.end_epoch):
            problems.append(
                problem(f"must be an integer, not {type(stage.end_epoch).__name__}", "end_epoch", stage.end_epoch)
            )
        elif _is_int(stage.start_epoch) and stage.end_epoch <= stage.start_epoch:
            problems.append(
                problem(f"must be greater than `start_epoch` ({stage.start_epoch})", "end_epoch", stage.end_epoch)
            )
    if stage.distillation is not None and not isinstance(stage.distillation, bool):
        problems.append(
            problem(
                f"must be true or false, not {type(stage.distillation).__name__}", "distillation", stage.distillation
            )
        )
    if stage.lambda_coef is not None:
        problems += _check_weight(stage.lambda_coef, problem, "lambda_coef")
    if stage.loss_weights is not None:
        if not isinstance(stage.loss_weights, Mapping):
            problems.append(
                problem(
                    f"must be a mapping of loss name to weight, not {type(stage.loss_weights).__name__}",
                    "loss_weights",
                    stage.loss_weights,
                )
            )
        else:
            for key, weight in stage.loss_weights.items():
                if not isinstance(key, str):
                    problems.append(problem("loss names must be strings", "loss_weights", key))
                    continue
                problems += _check_weight(weight, problem, f"loss_weights.{key}")
    return problems


def parse_stage(entry: Any, index: int) -> tuple[Optional[Stage], list[StageProblem]]:
    """Turn one entry of ``stage_schedule`` (a :class:`Stage` or a mapping) into a checked :class:`Stage`.

    Returns the stage (``None`` if it could not be built) and every problem found in it.

    Example::

        >>> stage, problems = parse_stage({"start_epoch": 0, "lamda_coef": 0.5}, 0)
        >>> print(problems[0])
        stage 0: `lamda_coef` = 0.5: is not a stage field; did you mean `lambda_coef`?
    """
    if isinstance(entry, Stage):
        return entry, stage_problems(entry, index)
    if not isinstance(entry, Mapping):
        return None, [
            StageProblem(
                f"a stage must be a mapping with the fields {', '.join(STAGE_FIELDS)}, not {type(entry).__name__}",
                index=index,
                field=None,
                value=entry,
            )
        ]
    raw_name = entry.get("name")
    name = raw_name if isinstance(raw_name, str) else None
    problems: list[StageProblem] = []
    known: dict[str, Any] = {}
    for key, value in entry.items():
        if key in STAGE_FIELDS:
            known[key] = value
        else:
            problems.append(
                StageProblem(
                    "is not a stage field",
                    index=index,
                    name=name,
                    field=str(key),
                    value=value,
                    hint=did_you_mean(str(key), STAGE_FIELDS) or f"the fields are: {', '.join(STAGE_FIELDS)}",
                )
            )
    if "start_epoch" not in known:
        problems.append(
            StageProblem("is required", index=index, name=name, field="start_epoch", value=None)
        )
        known["start_epoch"] = 0
    stage = Stage(**known)
    problems += stage_problems(stage, index)
    return stage, problems
