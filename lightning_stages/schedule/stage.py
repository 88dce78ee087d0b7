"""A stage of the schedule as the user writes it, and as it resolves for one epoch."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from lightning_stages.errors import StageConfigError, StageProblem, short_repr
from lightning_stages.schedule.config_input import MAX_DEPTH

__all__ = [
    "BASE_STAGE_NAME",
    "DEFAULT_LAMBDA_COEF",
    "STAGE_FIELDS",
    "TOO_LARGE",
    "ResolvedStage",
    "Stage",
    "default_stage_name",
    "plain",
    "plain_fields",
    "stage_name_of",
    "too_large",
]

BASE_STAGE_NAME = "base"
#: the problem of an integer no float can hold (``math.isfinite`` or a plot would overflow on it)
TOO_LARGE = f"is too large (more than {sys.float_info.max:.3g})"
DEFAULT_LAMBDA_COEF = 1.0


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One consecutive range of training, in epochs or in optimizer steps, with its own distillation and loss settings.

    Fields left out inherit the schedule's base settings: ``end_epoch`` defaults to the total epochs (``end_step``
    to the Trainer's ``max_steps``), ``distillation`` to the base flag, ``lambda_coef`` to the base coefficient, and
    every task loss that ``loss_weights`` does not name keeps its base weight. A stage counts in epochs
    (``start_epoch``) or in optimizer steps (``start_step``, as ``trainer.global_step``); one schedule uses one unit.

    Args:
        name: optional description, shown in logs. Defaults to ``"stage_<index>"``.
        start_epoch: first epoch of the stage (inclusive).
        end_epoch: first epoch after the stage (exclusive). ``None`` means the total epochs.
        distillation: whether the teacher-student loss is on in this stage. ``None`` inherits the base flag.
        lambda_coef: scales the sum of all distillation losses. ``None`` inherits the base value.
        loss_weights: weights of task losses (e.g. ``bce``, ``focal``, ``dice``, ``iou``, ``cls``) for this stage.
        start_step: first optimizer step of the stage (inclusive), instead of ``start_epoch``.
        end_step: first optimizer step after the stage (exclusive). ``None`` means the Trainer's ``max_steps``.
        ramp_epochs: ramp ``lambda_coef`` and the loss weights from the values in force before the stage to the
            stage's own over this many epochs (a number > 0; epoch schedules only).
        ramp_steps: the same over this many optimizer steps (an int > 0; either unit).
        ramp_shape: ``"linear"`` (the default) or ``"cosine"``.
        monitor: a logged metric the stage watches (e.g. ``"val/loss"``): to end the stage on a plateau
            (``patience``) and to know its best weights (``restore_best``).
        mode: ``"min"`` (the default) or ``"max"``: whether a lower or a higher ``monitor`` is better.
        patience: end the stage after this many validation runs without improvement (at the end of that epoch; in
            a step stage, at the optimizer step after that validation). ``end_epoch`` (``end_step``) stays a hard cap;
            the next stage starts right after. Needs ``monitor``.
        min_delta: a value improves only when it beats the stage's best by more than this (default 0).
        min_epochs: the least number of epochs the stage runs before a plateau may end it (epoch stages).
        min_steps: the least number of optimizer steps the stage runs before a plateau may end it (step stages).
        restore_best: at the stage's end, load the student's weights of its own best validation. Needs ``monitor``.
        data: the training data the stage wants (e.g. ``"unlabelled"``), set on the module as ``stage_data``; where it
            changes, the training dataloader is built again (in a step schedule, the running epoch ends there).
            ``None``: the module's ``stage_data`` is ``None``.

    Example::

        >>> stage = Stage(name="distill_only", start_epoch=0, end_epoch=100, distillation=True, lambda_coef=1.0,
        ...               loss_weights={"bce": 0, "focal": 0}, monitor="val/loss", patience=3, data="unlabelled")
        >>> stage.end_epoch, stage.loss_weights, stage.ends_on_plateau
        (100, {'bce': 0, 'focal': 0}, True)
    """

    name: Optional[str] = None
    start_epoch: Optional[int] = None
    end_epoch: Optional[int] = None
    distillation: Optional[bool] = None
    lambda_coef: Optional[float] = None
    loss_weights: Optional[dict[str, float]] = None
    # steps and ramps (issue 11)
    start_step: Optional[int] = None
    end_step: Optional[int] = None
    ramp_epochs: Optional[float] = None
    ramp_steps: Optional[int] = None
    ramp_shape: Optional[str] = None

    # adaptive stages (issue 12)
    monitor: Optional[str] = None
    mode: Optional[str] = None
    patience: Optional[int] = None
    min_delta: Optional[float] = None
    min_epochs: Optional[int] = None
    min_steps: Optional[int] = None
    restore_best: Optional[bool] = None
    data: Optional[str] = None

    @property
    def ends_on_plateau(self) -> bool:
        """Whether a plateau of ``monitor`` may end the stage before its ``end_epoch``."""
        return self.monitor is not None and self.patience is not None

    def __post_init__(self) -> None:
        # plain Python numbers (numpy's are accepted), and a private copy of every dict: never share (or later
        # mutate) the caller's
        if problems := plain_fields(self):
            raise StageConfigError(problems)

    def __repr__(self) -> str:  # the fields given, as the user wrote them
        return f"Stage({', '.join(f'{key}={value!r}' for key, value in self.to_dict().items())})"

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

    @property
    def unit(self) -> str:
        """``"step"`` if the stage gives ``start_step`` or ``end_step``, else ``"epoch"``.

        Example::

            >>> Stage(start_step=0, end_step=100).unit, Stage(start_epoch=0).unit
            ('step', 'epoch')
        """
        return "step" if self.start_step is not None or self.end_step is not None else "epoch"

    @property
    def start(self) -> Any:
        """The first epoch or step of the stage (inclusive), in its :attr:`unit`."""
        return self.start_step if self.unit == "step" else self.start_epoch

    @property
    def end(self) -> Any:
        """The first epoch or step after the stage (exclusive), in its :attr:`unit`; ``None`` if not given."""
        return self.end_step if self.unit == "step" else self.end_epoch

    @property
    def ramp_length(self) -> Any:
        """``ramp_steps`` or ``ramp_epochs``, whichever is given (``None``: no ramp)."""
        return self.ramp_steps if self.ramp_steps is not None else self.ramp_epochs


STAGE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Stage))


def too_large(value: Any) -> bool:
    """Whether ``value`` is an integer beyond the largest float (:data:`TOO_LARGE`).

    Example::

        >>> too_large(10 ** 400), too_large(10 ** 300), too_large(1e308)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max


def plain(value: Any, *, field: Optional[str] = None, name: Optional[str] = None) -> Any:
    """``value`` as plain Python data: numpy (or other 0-d array) scalars become ``bool``/``int``/``float``; float,
    int and str subclasses (``np.str_``, a ``StrEnum``) their base type, in mapping keys too (loss names); mappings
    ``dict`` and lists ``list`` (copies that share what the original shares, so an alias-heavy value costs its size in
    memory, not its expansion); anything else as it is. A real number beyond a float's range (a ``Fraction``, a
    ``numpy.longdouble``) becomes the ``int`` it truncates to, which every check refuses as :data:`TOO_LARGE`.

    What a checkpoint holds must load with ``torch.load(weights_only=True)``, which refuses numpy scalars.

    Raises:
        StageConfigError: ``value`` refers to itself or nests deeper than ``MAX_DEPTH`` levels; the problem names
            ``field`` of the stage (or base) ``name``.

    Example::

        >>> import numpy as np
        >>> plain({"bce": np.float32(0.5), "epochs": [np.int64(3), np.bool_(True)]})
        {'bce': 0.5, 'epochs': [3, True]}
        >>> type(plain(np.linspace(0, 1, 3)[1])).__name__
        'float'
        >>> w = {"bce": 1.0}
        >>> w["self"] = w
        >>> plain(w, field="loss_weights", name="base")
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem in the stage schedule:
          - base: `loss_weights` = {'bce': 1.0, 'self': {'bce': 1.0, 'self': {...}}}: refers to itself
    """
    try:
        return _plain(value, {}, set())
    except _NotPlain as err:
        raise StageConfigError(StageProblem(str(err), name=name, field=field, value=value)) from None


class _NotPlain(Exception):
    """A value :func:`plain` cannot copy: it refers to itself or nests too deeply."""


def _plain(value: Any, memo: dict[int, Any], open_ids: set[int]) -> Any:
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if isinstance(value, Mapping) or kind in (list, tuple):
        if id(value) in memo:
            return memo[id(value)]
        if id(value) in open_ids:
            raise _NotPlain("refers to itself")
        if len(open_ids) >= MAX_DEPTH:
            raise _NotPlain(f"is nested too deeply ({MAX_DEPTH} levels at most)")
        open_ids.add(id(value))
        memo[id(value)] = ({_plain(key, memo, open_ids): _plain(item, memo, open_ids) for key, item in value.items()}
                           if isinstance(value, Mapping) else kind(_plain(item, memo, open_ids) for item in value))
        open_ids.discard(id(value))
        return memo[id(value)]
    if isinstance(value, str):  # np.str_, a StrEnum member: pickled as their class, which weights_only refuses
        return str.__str__(value)
    item = getattr(value, "item", None)
    if callable(item) and hasattr(value, "dtype") and getattr(value, "shape", None) == ():
        try:  # a numpy scalar, a 0-d array or tensor
            value = item()
        except (TypeError, ValueError):
            return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, str):
        try:
            number = float(value)
        except OverflowError:  # a Fraction beyond a float's range (numpy's long double gives inf instead)
            number = math.inf
        if math.isinf(number):
            try:  # finite but beyond a float: the int it truncates to, which the checks name as too large
                return int(value)  # type: ignore[call-overload]  # numbers.Real need not define __int__
            except (OverflowError, ValueError, TypeError):  # infinite in its own type too
                pass
        return number
    return value


def plain_fields(data: Any, **values: Any) -> list[StageProblem]:
    """Set every init field of the frozen dataclass ``data`` to :func:`plain` of its value (or of ``values[name]``).

    Returns:
        The values that refer to themselves or nest too deeply (those fields are left as they are), each naming the
        field and the stage (by its name; its index is the schedule's to add) or the base.

    Example::

        >>> import numpy as np
        >>> Stage(start_epoch=np.int64(2), lambda_coef=np.float64(0.5)).to_dict()
        {'start_epoch': 2, 'lambda_coef': 0.5}
    """
    name = BASE_STAGE_NAME if not isinstance(data, Stage) else "stage" + (
        f" {short_repr(data.name)}" if isinstance(data.name, str) else "")
    problems: list[StageProblem] = []
    for f in fields(data):
        if f.init:
            try:
                value = plain(values.get(f.name, getattr(data, f.name)), field=f.name, name=name)
            except StageConfigError as err:
                problems += err.problems
            else:
                object.__setattr__(data, f.name, value)
    return problems


@dataclass(frozen=True)
class ResolvedStage:
    """The settings in force at one epoch (or step, or batch of a ramp): a stage with every base value filled in.

    Args:
        name: the stage's name, or ``"base"`` where no stage covers the epoch.
        index: the stage's position in ``stage_schedule`` as written, or ``None`` for the base settings.
        position: 1-based order of the stage by start epoch (``None`` for the base settings).
        num_stages: how many stages the schedule has.
        start_epoch: first epoch of the range (inclusive); its first optimizer step when ``unit`` is ``"step"``.
        end_epoch: first epoch (or step) after the range (exclusive), ``None`` if open-ended.
        distillation: whether the distillation loss is on (during a ramp: the effective coefficient is > 0 or the
            stage distills).
        lambda_coef: the distillation coefficient (during a ramp: the ramped effective coefficient).
        loss_weights: the complete weight of every task loss.
        unit: ``"epoch"`` or ``"step"``: what ``start_epoch`` and ``end_epoch`` count.
        ramping: whether these values are part-way through the stage's ramp.
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
    unit: str = "epoch"
    ramping: bool = False
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
