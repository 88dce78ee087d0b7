"""The stage schedule: stages plus the base settings they override, resolved by a pure function of the epoch."""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from lightning_stages.errors import StageConfigError, StageProblem, stage_label
from lightning_stages.schedule import checks, seed_format
from lightning_stages.schedule.stage import BASE_STAGE_NAME, DEFAULT_LAMBDA_COEF, ResolvedStage, Stage, stage_name_of

__all__ = ["BASE_STAGE_NAME", "DEFAULT_LAMBDA_COEF", "StageSchedule"]


@dataclass(frozen=True)
class StageSchedule:
    """Consecutive stages plus the base settings they override.

    Building a schedule checks it: every problem (unknown keys, wrong types, negative or non-finite
    numbers, ``start_epoch >= end_epoch``, overlaps, weight keys without a base) is collected and raised
    together as one :class:`~lightning_stages.StageConfigError`. The caller's lists and dicts are copied,
    never changed.

    Args:
        stages: the stages, as :class:`Stage` objects or plain mappings in the seed's format.
            Empty means the single-stage behaviour: the base settings for every epoch.
        loss_weights: base weight of every task loss (``train.loss_weights``). ``None`` leaves them to be
            filled in later (the callback takes them from the LightningModule).
        distillation: base distillation flag (``distillation.enable``); ``None`` means not set.
        lambda_coef: base distillation coefficient (``distillation.lambda_coef``); ``None`` means not set.
        total_epochs: total epochs (``train.epochs`` or the Trainer's ``max_epochs``); the end of stages
            that omit ``end_epoch``. ``None``: such stages are open-ended.

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
            problems += found
            if stage is not None:
                stages.append(stage)
                if not any(p.field in ("start_epoch", "end_epoch") for p in found):
                    ranged.append((index, stage))
                if stage.loss_weights is None or isinstance(stage.loss_weights, Mapping):
                    weighted.append((index, stage))
        object.__setattr__(self, "stages", tuple(stages))
        problems += checks.base_problems(self.loss_weights, self.distillation, self.lambda_coef, self.total_epochs)
        if isinstance(self.loss_weights, Mapping):
            object.__setattr__(self, "loss_weights", dict(self.loss_weights))
            problems += checks.stage_weight_key_problems(weighted, list(self.loss_weights))
        problems += checks.overlap_problems(ranged)
        if self.total_epochs is not None and not any(p.field == "total_epochs" for p in problems):
            problems += checks.starts_beyond_problems(ranged, self.total_epochs, "total_epochs")
        if problems:
            raise StageConfigError(problems)
        self._index()

    def _index(self) -> None:
        order = tuple(sorted(range(len(self.stages)), key=lambda i: self.stages[i].start_epoch))
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_starts", tuple(self.stages[i].start_epoch for i in order))

    @classmethod
    def _checked_elsewhere(cls, *values: Any) -> StageSchedule:
        """Build from ``(stages, loss_weights, distillation, lambda_coef, total_epochs)`` without checking again:
        the caller (:func:`~lightning_stages.schedule.bind.bind_schedule`) checked them, so a config is checked once."""
        schedule = object.__new__(cls)
        for name, value in zip(("stages", "loss_weights", "distillation", "lambda_coef", "total_epochs"), values):
            object.__setattr__(schedule, name, tuple(value) if name == "stages" else value)
        schedule._index()
        return schedule

    # ------------------------------------------------------------------ checks

    def missing_weight_problems(self) -> list[StageProblem]:
        """Without base weights, each stage must name every task loss any stage names (:mod:`.checks`)."""
        return checks.missing_weight_problems(self.stages, self.loss_weights)

    def epoch_problems(self, max_epochs: int, label: str = "max_epochs") -> list[StageProblem]:
        """Stages that start at or after ``max_epochs``, so would never run in such a run (:mod:`.checks`)."""
        return checks.starts_beyond_problems(enumerate(self.stages), max_epochs, label)

    def weight_key_problems(self, loss_keys: list[str]) -> list[StageProblem]:
        """Stage weight keys that name no task loss in ``loss_keys``, with a did-you-mean (:mod:`.checks`)."""
        return checks.stage_weight_key_problems(enumerate(self.stages), list(loss_keys))

    # ------------------------------------------------------------------ the seed's format

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
                  lambda_coef: Optional[float] = None, total_epochs: Optional[int] = None) -> StageSchedule:
        """A copy whose unset base settings are filled with the given ones (set ones are kept).

        Example::

            >>> StageSchedule().with_base(lambda_coef=0.5, total_epochs=3).at(0).lambda_coef
            0.5
        """
        weights = dict(loss_weights) if loss_weights is not None else None
        return replace(self, loss_weights=self.loss_weights if self.loss_weights is not None else weights,
                       distillation=self.distillation if self.distillation is not None else distillation,
                       lambda_coef=self.lambda_coef if self.lambda_coef is not None else lambda_coef,
                       total_epochs=self.total_epochs if self.total_epochs is not None else total_epochs)

    def with_total_epochs(self, total_epochs: Optional[int]) -> StageSchedule:
        """A copy that ends at ``total_epochs`` instead (``None``: open-ended); checks only what the new end changes.

        Example::

            >>> StageSchedule([{"start_epoch": 0}], total_epochs=300).with_total_epochs(10).timeline()[0].end_epoch
            10
        """
        problems = checks.base_problems(total_epochs=total_epochs)
        if total_epochs is not None and not problems:
            problems = checks.starts_beyond_problems(enumerate(self.stages), total_epochs, "total_epochs")
        if problems:
            raise StageConfigError(problems)
        return self._checked_elsewhere(self.stages, self.loss_weights, self.distillation, self.lambda_coef,
                                       total_epochs)

    # ------------------------------------------------------------------ resolution

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

    def end_of(self, stage: Stage, total_epochs: Optional[int] = None) -> Optional[int]:
        """The exclusive end epoch of ``stage``: its own, else the total epochs, else ``None`` (open-ended)."""
        if stage.end_epoch is not None:
            return stage.end_epoch
        return total_epochs if total_epochs is not None else self.total_epochs

    def at(self, epoch: int, total_epochs: Optional[int] = None) -> ResolvedStage:
        """The settings in force at ``epoch`` (0-based). A pure function: same input, same output, no side effects.

        ``total_epochs`` ends the stages that omit ``end_epoch``; it defaults to the schedule's ``total_epochs``.

        Example::

            >>> s = StageSchedule([{"name": "warm", "start_epoch": 2, "end_epoch": 4, "distillation": True}],
            ...                   loss_weights={"cls": 1.0}, lambda_coef=0.3)
            >>> s.at(1).label, s.at(2).label, s.at(2).lambda_coef, s.at(4).distillation
            ('base (no stage)', 'warm (1/1)', 0.3, False)
        """
        total = total_epochs if total_epochs is not None else self.total_epochs
        weights = self.base_loss_weights
        pos = bisect.bisect_right(self._starts, epoch) - 1
        if pos >= 0:
            index = self._order[pos]
            stage = self.stages[index]
            end = self.end_of(stage, total)
            if end is None or epoch < end:
                for key, value in (stage.loss_weights or {}).items():
                    weights[key] = float(value)
                return ResolvedStage(
                    stage_name_of(stage, index), index, pos + 1, len(self.stages), stage.start_epoch, end,
                    distillation=stage.distillation if stage.distillation is not None else self.base_distillation,
                    lambda_coef=float(stage.lambda_coef) if stage.lambda_coef is not None else self.base_lambda_coef,
                    loss_weights=weights, data=stage.data,
                )
        return self.base_stage(*self._gap_around(epoch, total))

    def _gap_around(self, epoch: int, total: Optional[int]) -> tuple[int, Optional[int]]:
        start, end = 0, total
        for i in self._order:
            stage = self.stages[i]
            stage_end = self.end_of(stage, total)
            if stage_end is not None and stage_end <= epoch:
                start = max(start, stage_end)
            if stage.start_epoch > epoch:
                end = stage.start_epoch if end is None else min(end, stage.start_epoch)
                break
        return start, end

    def uncovered_ranges(self, total_epochs: Optional[int] = None) -> list[tuple[int, Optional[int]]]:
        """The epoch ranges ``[start, end)`` no stage covers (``end`` ``None``: to the last epoch); none without stages.

        Example::

            >>> StageSchedule([{"start_epoch": 2, "end_epoch": 4}]).uncovered_ranges(6)
            [(0, 2), (4, 6)]
        """
        if not self.stages:
            return []
        total = total_epochs if total_epochs is not None else self.total_epochs
        gaps: list[tuple[int, Optional[int]]] = []
        cursor: Optional[int] = 0
        for i in self._order:
            stage = self.stages[i]
            if cursor is not None and stage.start_epoch > cursor:
                gaps.append((cursor, stage.start_epoch if total is None else min(stage.start_epoch, total)))
            cursor = self.end_of(stage, total)
            if total is not None and cursor is not None and cursor >= total:
                cursor = None
        if cursor is not None and (total is None or cursor < total):
            gaps.append((cursor, total))
        return [(a, b) for a, b in gaps if b is None or a < b]

    def timeline(self, total_epochs: Optional[int] = None) -> list[ResolvedStage]:
        """The resolved settings range by range, stages and uncovered gaps, in epoch order.

        Example::

            >>> [r.label for r in StageSchedule([{"name": "a", "start_epoch": 1, "end_epoch": 2}]).timeline(3)]
            ['base (no stage)', 'a (1/1)', 'base (no stage)']
        """
        total = total_epochs if total_epochs is not None else self.total_epochs
        out: list[ResolvedStage] = []
        epoch = 0
        while total is None or epoch < total:
            resolved = self.at(epoch, total)
            out.append(resolved)
            if resolved.end_epoch is None:
                break
            epoch = resolved.end_epoch
        return out

    # ------------------------------------------------------------------ queries

    def first_distilling_label(self) -> Optional[str]:
        """The first setting (by start epoch) that needs teachers, as error messages name it; ``None`` if none.

        Example::

            >>> StageSchedule([{"start_epoch": 2, "distillation": True}]).first_distilling_label()
            "stage 0 ('stage_0')"
        """
        if self.base_distillation:
            return f"{BASE_STAGE_NAME} (distillation.enable)"
        for index in self._order:
            stage = self.stages[index]
            if stage.distillation:
                return stage_label(index, stage_name_of(stage, index))
        return None

    def distilling_until(self) -> float:
        """The exclusive end epoch of the last distilling range: ``inf`` if open-ended, 0 if nothing distills.

        Example::

            >>> StageSchedule([{"start_epoch": 1, "end_epoch": 3, "distillation": True}], total_epochs=5).distilling_until()
            3.0
        """
        ends = [r.end_epoch for r in self.timeline() if r.distillation]
        return max((math.inf if end is None else float(end) for end in ends), default=0.0)

    def base_stage(self, start_epoch: int = 0, end_epoch: Optional[int] = None) -> ResolvedStage:
        """The base settings over ``[start_epoch, end_epoch)``; by default every epoch: what runs outside a fit.

        Example::

            >>> StageSchedule([{"start_epoch": 0, "distillation": True}], lambda_coef=0.5).base_stage().label
            'base (no stage)'
        """
        return ResolvedStage(BASE_STAGE_NAME, None, None, len(self.stages), start_epoch, end_epoch,
                             self.base_distillation, self.base_lambda_coef, self.base_loss_weights)

    def cut_short(self, max_epochs: int) -> list[tuple[int, str, int]]:
        """``(index, name, end)`` of every stage that starts before ``max_epochs`` but ends after it.

        Example::

            >>> StageSchedule([{"start_epoch": 0, "end_epoch": 8}]).cut_short(5)
            [(0, 'stage_0', 8)]
        """
        ends = [(index, stage, self.end_of(stage)) for index, stage in enumerate(self.stages)]
        return [(index, stage_name_of(stage, index), end) for index, stage, end in ends
                if end is not None and end > max_epochs and stage.start_epoch < max_epochs]

