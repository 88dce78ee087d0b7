"""The stage schedule: stages plus the base settings they override, resolved by a pure function of the epoch (and
batch, during a ramp) or of the optimizer step."""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from lightning_stages.errors import StageConfigError, StageProblem
from lightning_stages.schedule import checks, ramps, seed_format, timeline, unit_checks
from lightning_stages.schedule import stage as stage_module
from lightning_stages.schedule.stage import BASE_STAGE_NAME, DEFAULT_LAMBDA_COEF, ResolvedStage, Stage, stage_name_of

__all__ = ["BASE_STAGE_NAME", "DEFAULT_LAMBDA_COEF", "StageSchedule"]


@dataclass(frozen=True)
class StageSchedule:
    """Consecutive stages plus the base settings they override.

    Building a schedule checks it: every problem (unknown keys, wrong types, negative or non-finite numbers,
    ``start_epoch >= end_epoch``, overlaps, weight keys without a base) is collected and raised together as one
    :class:`~lightning_stages.StageConfigError`. The caller's lists and dicts are copied, never changed.

    Args:
        stages: the stages, as :class:`Stage` objects or plain mappings in the seed's format.
            Empty means the single-stage behaviour: the base settings for every epoch.
        loss_weights: base weight of every task loss (``train.loss_weights``). ``None`` leaves them to be
            filled in later (the callback takes them from the LightningModule).
        distillation: base distillation flag (``distillation.enable``); ``None`` means not set.
        lambda_coef: base distillation coefficient (``distillation.lambda_coef``); ``None`` means not set.
        total_epochs: total epochs (``train.epochs`` or the Trainer's ``max_epochs``); the end of stages
            that omit ``end_epoch``. ``None``: such stages are open-ended.
        total_steps: total optimizer steps (``train.max_steps`` or the Trainer's ``max_steps``); the end of step
            stages that omit ``end_step``.

    Raises:
        StageConfigError: with every problem of the schedule.

    Example::

        >>> schedule = StageSchedule([
        ...     {"name": "distill_only", "start_epoch": 0, "end_epoch": 100, "distillation": True,
        ...      "lambda_coef": 1.0, "loss_weights": {"bce": 0, "focal": 0}},
        ...     {"name": "finetune_only", "start_epoch": 100, "distillation": False, "lambda_coef": 0.0},
        ... ], loss_weights={"bce": 1.0, "focal": 15.0}, total_epochs=300)
        >>> schedule.at(150).name, schedule.at(150).loss_weights
        ('finetune_only', {'bce': 1.0, 'focal': 15.0})
        >>> schedule.at(0).distillation, schedule.needs_teachers
        (True, True)
    """

    stages: tuple[Stage, ...] = ()
    loss_weights: Optional[dict[str, float]] = None
    distillation: Optional[bool] = None
    lambda_coef: Optional[float] = None
    total_epochs: Optional[int] = None
    total_steps: Optional[int] = None
    _order: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)
    _starts: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = self.stages if self.stages is not None else ()
        if problems := checks.stage_list_problems(raw):
            raise StageConfigError(problems)
        stages: list[Stage] = []
        # (index as written, stage) of the stages whose epoch range is well-formed: checked against each other
        # even when other fields have problems, so that every problem is reported at once
        ranged: list[tuple[int, Stage]] = []
        weighted: list[tuple[int, Stage]] = []
        for index, entry in enumerate(raw):
            stage, found = checks.parse_stage(entry, index)
            if stage is not None:
                found += unit_checks.step_field_problems(stage, index)
            problems += found
            if stage is not None:
                stages.append(stage)
                if not any(p.field in ("start_epoch", "end_epoch", "start_step", "end_step") for p in found):
                    ranged.append((index, stage))
                if stage.loss_weights is None or isinstance(stage.loss_weights, Mapping):
                    weighted.append((index, stage))
        # the base too: plain copies, numpy numbers made plain; a value that refers to itself is refused at once
        if found := stage_module.plain_fields(self, stages=tuple(stages)):
            raise StageConfigError(problems + found)
        problems += checks.base_problems(self.loss_weights, self.distillation, self.lambda_coef, self.total_epochs)
        # the same rule for total_steps: a positive integer
        problems += [replace(p, field="total_steps") for p in checks.base_problems(total_epochs=self.total_steps)]
        if isinstance(self.loss_weights, Mapping):
            problems += checks.stage_weight_key_problems(weighted, list(self.loss_weights))
        problems += checks.overlap_problems(ranged) + unit_checks.mixed_unit_problems(ranged)
        if self.total_epochs is not None and not any(p.field == "total_epochs" for p in problems):
            problems += checks.starts_beyond_problems(ranged, self.total_epochs, "total_epochs")
        if self.total_steps is not None and not any(p.field == "total_steps" for p in problems):
            problems += checks.starts_beyond_problems(ranged, self.total_steps, "total_steps")
        if not any(p.field and p.field.startswith("ramp_") for p in problems):
            problems += unit_checks.ramp_length_problems(ranged, self._total())
        if problems:
            raise StageConfigError(problems)
        self._index()

    def _index(self) -> None:
        order = tuple(sorted(range(len(self.stages)), key=lambda i: self.stages[i].start))
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_starts", tuple(self.stages[i].start for i in order))

    @classmethod
    def _checked_elsewhere(cls, *values: Any) -> StageSchedule:
        """Build from ``(stages, loss_weights, distillation, lambda_coef, total_epochs, total_steps)`` without checking
        again: the caller (:func:`~lightning_stages.schedule.bind.bind_schedule`) checked them, so a config is checked
        once."""
        schedule = object.__new__(cls)
        names = ("stages", "loss_weights", "distillation", "lambda_coef", "total_epochs", "total_steps")
        for name, value in zip(names, values, strict=True):
            object.__setattr__(schedule, name, tuple(value) if name == "stages" else value)
        schedule._index()
        return schedule

    def missing_weight_problems(self) -> list[StageProblem]:
        """Without base weights, each stage must name every task loss any stage names (:mod:`.checks`)."""
        return checks.missing_weight_problems(self.stages, self.loss_weights)

    def epoch_problems(self, max_epochs: int, label: str = "max_epochs") -> list[StageProblem]:
        """Stages that start at or after ``max_epochs``, so would never run in such a run (:mod:`.checks`)."""
        return checks.starts_beyond_problems(enumerate(self.stages), max_epochs, label)

    def weight_key_problems(self, loss_keys: list[str]) -> list[StageProblem]:
        """Stage weight keys that name no task loss in ``loss_keys``, with a did-you-mean (:mod:`.checks`)."""
        return checks.stage_weight_key_problems(enumerate(self.stages), list(loss_keys))

    @classmethod
    def from_config(cls, source: Union[str, os.PathLike, Mapping[str, Any]]) -> StageSchedule:
        """Read a schedule in the seed's format (:mod:`.seed_format`) from a JSON/YAML file or a loaded mapping.

        Reads ``stage_schedule`` and, as the base, ``train.loss_weights``, ``train.epochs``, ``distillation.enable``
        and ``distillation.lambda_coef``; other root keys are ignored. No ``stage_schedule``: single-stage training.

        Raises:
            StageConfigError: with every problem in the config, or if the file cannot be read or parsed.

        Example::

            >>> s = StageSchedule.from_config({"distillation": {"lambda_coef": 0.5}, "dataset": {"root": "ignored"}})
            >>> s.at(3).label, s.at(3).lambda_coef, s.needs_teachers
            ('base (no stage)', 0.5, False)
        """
        return cls(**seed_format.schedule_arguments(source))

    def to_dict(self) -> dict[str, Any]:
        """The schedule in the seed's config format (plain data, safe to put in a checkpoint; :mod:`.seed_format`)."""
        return seed_format.to_dict(self)

    def diff(self, other: StageSchedule) -> list[str]:
        """Human-readable differences from ``self`` to ``other``; empty when they resolve alike (:mod:`.seed_format`).

        Example::

            >>> StageSchedule([{"name": "d", "start_epoch": 0}]).diff(StageSchedule([{"name": "d", "start_epoch": 1}]))
            ["stage 0 ('d'): start_epoch 0 -> 1"]
        """
        return seed_format.diff(self, other)

    def with_base(self, loss_weights: Optional[Mapping[str, float]] = None, distillation: Optional[bool] = None,
                  lambda_coef: Optional[float] = None, total_epochs: Optional[int] = None,
                  total_steps: Optional[int] = None) -> StageSchedule:
        """A copy whose unset base settings are filled with the given ones (set ones are kept).

        Example::

            >>> StageSchedule().with_base(lambda_coef=0.5, total_epochs=3).at(0).lambda_coef
            0.5
        """
        weights = dict(loss_weights) if loss_weights is not None else None
        return replace(self, loss_weights=self.loss_weights if self.loss_weights is not None else weights,
                       distillation=self.distillation if self.distillation is not None else distillation,
                       lambda_coef=self.lambda_coef if self.lambda_coef is not None else lambda_coef,
                       total_epochs=self.total_epochs if self.total_epochs is not None else total_epochs,
                       total_steps=self.total_steps if self.total_steps is not None else total_steps)

    def with_total_epochs(self, total_epochs: Optional[int]) -> StageSchedule:
        """A copy that ends at ``total_epochs`` instead (``None``: open-ended); checks only what the new end changes.

        Example::

            >>> StageSchedule([{"start_epoch": 0}], total_epochs=300).with_total_epochs(10).timeline()[0].end_epoch
            10
        """
        problems = checks.base_problems(total_epochs=(total_epochs := stage_module.plain(total_epochs)))  # numpy too
        if total_epochs is not None and not problems:
            problems = checks.starts_beyond_problems(enumerate(self.stages), total_epochs, "total_epochs")
        if problems:
            raise StageConfigError(problems)
        return self._checked_elsewhere(self.stages, self.loss_weights, self.distillation, self.lambda_coef,
                                       total_epochs, self.total_steps)

    @property
    def base_distillation(self) -> bool:  # False when not set
        return bool(self.distillation)

    @property
    def base_lambda_coef(self) -> float:  # 1.0 when not set
        return float(self.lambda_coef) if self.lambda_coef is not None else DEFAULT_LAMBDA_COEF

    @property
    def base_loss_weights(self) -> dict[str, float]:
        """The complete base weights: a float copy of ``loss_weights`` (empty when not set)."""
        return {k: float(v) for k, v in (self.loss_weights or {}).items()}

    @property
    def needs_teachers(self) -> bool:
        """Whether teachers must be prepared: the base flag is on or any stage distills."""
        return self.base_distillation or any(
            (s.distillation if s.distillation is not None else self.base_distillation) for s in self.stages
        )

    @property
    def unit(self) -> str:
        """``"epoch"`` or ``"step"``: what the stages count (one unit per schedule; ``"epoch"`` without stages)."""
        return self.stages[0].unit if self.stages else "epoch"

    def _total(self, total: Optional[int] = None) -> Optional[int]:  # the given total, else the schedule's (in its unit)
        return total if total is not None else self.total_steps if self.unit == "step" else self.total_epochs

    def end_of(self, stage: Stage, total_epochs: Optional[int] = None) -> Optional[int]:
        """The exclusive end of ``stage`` in the schedule's unit: its own, else the total, else ``None`` (open-ended)."""
        return stage.end if stage.end is not None else self._total(total_epochs)

    def at(self, epoch: int, batch_index: int = 0, batches_per_epoch: Optional[float] = None, *,
           accumulate_grad_batches: int = 1, total_epochs: Optional[int] = None) -> ResolvedStage:
        """The settings in force at batch ``batch_index`` of ``epoch`` (0-based) of an epoch schedule. A pure
        function: same input, same output, no side effects.

        Outside a ramp they are the same for every batch of the epoch. During a ramp (:mod:`.ramps`) they depend on
        the batch: ``batches_per_epoch`` is ``trainer.num_training_batches``, and ``accumulate_grad_batches`` turns
        batches into optimizer steps for ``ramp_steps``. ``total_epochs`` ends the stages that omit ``end_epoch``;
        it defaults to the schedule's ``total_epochs``.

        Raises:
            ValueError: the schedule counts in steps (use :meth:`at_step`), or a ramp needs ``batches_per_epoch``.

        Example::

            >>> s = StageSchedule([{"name": "warm", "start_epoch": 2, "end_epoch": 4, "distillation": True}],
            ...                   loss_weights={"cls": 1.0}, lambda_coef=0.3)
            >>> s.at(1).label, s.at(2).label, s.at(2).lambda_coef, s.at(4).distillation
            ('base (no stage)', 'warm (1/1)', 0.3, False)
            >>> ramp = StageSchedule([{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True},
            ...                       {"name": "ft", "start_epoch": 2, "distillation": False, "ramp_epochs": 1}],
            ...                      lambda_coef=1.0, total_epochs=4)
            >>> ramp.at(2, batch_index=1, batches_per_epoch=4).lambda_coef, ramp.at(3).lambda_coef
            (0.75, 1.0)
        """
        if self.unit != "epoch":
            raise ValueError("this schedule counts in optimizer steps: resolve it with `at_step(global_step)`")
        resolved = self.stage_at(epoch, total_epochs)
        stage = self.stages[resolved.index] if resolved.index is not None else None
        if stage is None or stage.ramp_length is None:
            return resolved
        p = ramps.epoch_progress(stage, epoch, batch_index, batches_per_epoch, accumulate_grad_batches)
        return ramps.ramped(self._before(stage, total_epochs), resolved, stage.ramp_shape, p)

    def at_step(self, step: int, *, total_steps: Optional[int] = None) -> ResolvedStage:
        """The settings in force at optimizer step ``step`` (``trainer.global_step``) of a step schedule; a pure
        function. ``total_steps`` ends the stages that omit ``end_step`` (default: the schedule's ``total_steps``).

        Raises:
            ValueError: the schedule counts in epochs (use :meth:`at`).

        Example::

            >>> s = StageSchedule([{"name": "kd", "start_step": 0, "end_step": 100, "distillation": True},
            ...                    {"name": "ft", "start_step": 100, "ramp_steps": 40, "ramp_shape": "cosine"}],
            ...                   loss_weights={"cls": 1.0}, total_steps=300)
            >>> s.at_step(99).name, round(s.at_step(120).lambda_coef, 12), s.at_step(139).distillation
            ('kd', 0.5, True)
            >>> s.at_step(140).distillation, s.at_step(140).lambda_coef
            (False, 1.0)
        """
        if self.unit != "step":
            raise ValueError("this schedule counts in epochs: resolve it with `at(epoch, batch_index, batches)`")
        resolved = self.stage_at(step, total_steps)
        stage = self.stages[resolved.index] if resolved.index is not None else None
        if stage is None or stage.ramp_steps is None:
            return resolved
        return ramps.ramped(self._before(stage, total_steps), resolved, stage.ramp_shape,
                            ramps.step_progress(stage, step))

    def _before(self, stage: Stage, total: Optional[int]) -> ResolvedStage:
        """What a ramp starts from: the settings of the epoch (or step) before ``stage``, or the base at 0."""
        return self.stage_at(stage.start - 1, total) if stage.start > 0 else self.base_stage(0, stage.start)

    def stage_at(self, position: int, total: Optional[int] = None) -> ResolvedStage:
        """The stage in force at an epoch (or step, in a step schedule) with its own values: no ramp applied.

        Example::

            >>> StageSchedule([{"name": "ft", "start_step": 5, "ramp_steps": 2}]).stage_at(5).name
            'ft'
        """
        total = self._total(total)
        weights = self.base_loss_weights
        pos = bisect.bisect_right(self._starts, position) - 1
        if pos >= 0:
            index = self._order[pos]
            stage = self.stages[index]
            end = self.end_of(stage, total)
            if end is None or position < end:
                for key, value in (stage.loss_weights or {}).items():
                    weights[key] = float(value)
                return ResolvedStage(
                    stage_name_of(stage, index), index, pos + 1, len(self.stages), stage.start, end,
                    distillation=stage.distillation if stage.distillation is not None else self.base_distillation,
                    lambda_coef=float(stage.lambda_coef) if stage.lambda_coef is not None else self.base_lambda_coef,
                    loss_weights=weights, unit=self.unit, data=stage.data,
                )
        return self.base_stage(*timeline.gap_around(self, position, total))

    def uncovered_ranges(self, total_epochs: Optional[int] = None) -> list[tuple[int, Optional[int]]]:
        """The ranges ``[start, end)`` no stage covers, in the schedule's unit (:func:`.timeline.uncovered_ranges`)."""
        return timeline.uncovered_ranges(self, self._total(total_epochs))

    def timeline(self, total_epochs: Optional[int] = None) -> list[ResolvedStage]:
        """The resolved settings range by range, stages and uncovered gaps, in order (:func:`.timeline.timeline`)."""
        return timeline.timeline(self, self._total(total_epochs))

    def first_distilling_label(self) -> Optional[str]:
        """The first setting that needs teachers, as errors name it (:func:`.timeline.first_distilling_label`)."""
        return timeline.first_distilling_label(self)

    def distilling_until(self) -> float:
        """The exclusive end of the last distilling range (:func:`.timeline.distilling_until`)."""
        return timeline.distilling_until(self)

    def base_stage(self, start_epoch: int = 0, end_epoch: Optional[int] = None) -> ResolvedStage:
        """The base settings over ``[start_epoch, end_epoch)``; by default every epoch: what runs outside a fit.

        Example::

            >>> StageSchedule([{"start_epoch": 0, "distillation": True}], lambda_coef=0.5).base_stage().label
            'base (no stage)'
        """
        return ResolvedStage(BASE_STAGE_NAME, None, None, len(self.stages), start_epoch, end_epoch,
                             self.base_distillation, self.base_lambda_coef, self.base_loss_weights, unit=self.unit)

    def cut_short(self, max_epochs: int) -> list[tuple[int, str, int]]:
        """``(index, name, end)`` of every stage that starts before ``max_epochs`` (or ``max_steps``, in a step
        schedule) but ends after it (:func:`.timeline.cut_short`)."""
        return timeline.cut_short(self, max_epochs)
