"""A stage of the schedule as the user writes it, and as it resolves for one epoch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

__all__ = [
    "BASE_STAGE_NAME",
    "DEFAULT_LAMBDA_COEF",
    "STAGE_FIELDS", "ResolvedStage", "Stage", "default_stage_name",
    "stage_name_of",
]

BASE_STAGE_NAME = "base"
DEFAULT_LAMBDA_COEF = 1.0


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
        data: the training data the stage wants (e.g. ``"unlabelled"``), set on the module as ``stage_data``; where it
            changes, the training dataloader is built again. ``None``: the module's ``stage_data`` is ``None``.

    Example::

        >>> Stage(name="distill_only", start_epoch=0, end_epoch=100, distillation=True, lambda_coef=1.0,
        ...       loss_weights={"bce": 0, "focal": 0})
        Stage(name='distill_only', start_epoch=0, end_epoch=100, distillation=True, lambda_coef=1.0, loss_weights={'bce': 0, 'focal': 0}, data=None)
    """

    name: Optional[str] = None
    start_epoch: int
    end_epoch: Optional[int] = None
    distillation: Optional[bool] = None
    lambda_coef: Optional[float] = None
    loss_weights: Optional[dict[str, float]] = None
    # adaptive stages (issue 12)
    data: Optional[str] = None

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
        data: the stage's ``data`` (``None`` where it gives none, and for the base settings).
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
    data: Optional[str] = None

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


def default_stage_name(index: int) -> str:
    """The name of a stage that gives none: ``stage_<index>``, its position in ``stage_schedule`` as written.

    Example::

        >>> default_stage_name(2)
        'stage_2'
    """
    return f"stage_{index}"


def stage_name_of(stage: Stage, index: int) -> str:
    """The stage's own name, else :func:`default_stage_name`.

    Example::

        >>> stage_name_of(Stage(start_epoch=0), 1), stage_name_of(Stage(name="kd", start_epoch=0), 1)
        ('stage_1', 'kd')
    """
    return stage.name if stage.name is not None else default_stage_name(index)
