"""The stage schedule: stages plus the base settings they override, resolved by a pure function of the epoch."""

from __future__ import annotations

import bisect
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from lightning_stages.errors import StageConfigError, StageProblem, did_you_mean
from lightning_stages.schedule.seed_format import load_config
from lightning_stages.schedule.stage import ResolvedStage, Stage, parse_stage

__all__ = ["BASE_STAGE_NAME", "DEFAULT_LAMBDA_COEF", "StageSchedule"]

BASE_STAGE_NAME = "base"
DEFAULT_LAMBDA_COEF = 1.0

# root keys of the seed's config format that the schedule reads; everything else (dataset, model, ...) is ignored
_ROOT_KEYS = ("stage_schedule", "train", "distillation")
_TRAIN_KEYS = ("loss_weights", "epochs")
_DISTILLATION_KEYS = ("enable", "lambda_coef")


def _base_problem(message: str, field_name: str, value: Any, hint: Optional[str] = None) -> StageProblem:
    return StageProblem(message, name=BASE_STAGE_NAME, field=field_name, value=value, hint=hint)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_base_number(value: Any, field_name: str) -> list[StageProblem]:
    if not _is_real(value):
        return [_base_problem(f"must be a number, not {type(value).__name__}", field_name, value)]
    if not math.isfinite(value):
        return [_base_problem("must be finite", field_name, value)]
    if value < 0:
        return [_base_problem("must be >= 0", field_name, value)]
    return []


def _near_miss(section: Mapping[str, Any], wanted: Sequence[str], prefix: str) -> list[StageProblem]:
    """Flag keys that look like a misspelling of a key we read, when the real key is absent."""
    problems = []
    for key in section:
        if not isinstance(key, str) or key in wanted:
            continue
        hint = did_you_mean(key, [w for w in wanted if w not in section])
        if hint is not None:
            problems.append(
                StageProblem("is not a key the schedule reads", name="config", field=prefix + key, value=section[key],
                             hint=hint)
            )
    return problems


def _starts_beyond(indexed: Iterable[tuple[int, Stage]], max_epochs: int, label: str) -> list[StageProblem]:
    """Stages (with their index as written) that start at or after ``max_epochs`` and so would never run."""
    return [
        StageProblem(
            f"starts at or beyond {label} ({max_epochs}), so it would never run",
            index=index, name=stage.name, field="start_epoch", value=stage.start_epoch,
        )
        for index, stage in indexed
        if isinstance(stage.start_epoch, int) and stage.start_epoch >= max_epochs
    ]


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

        >>> schedule = StageSchedule(
        ...     [
        ...         {"name": "distill_only", "start_epoch": 0, "end_epoch": 100, "distillation": True,
        ...          "lambda_coef": 1.0, "loss_weights": {"bce": 0, "focal": 0}},
        ...         {"name": "finetune_only", "start_epoch": 100, "distillation": False, "lambda_coef": 0.0},
        ...     ],
        ...     loss_weights={"bce": 1.0, "focal": 15.0},
        ...     total_epochs=300,
        ... )
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
        problems: list[StageProblem] = []
        raw = self.stages
        if raw is None:
            raw = ()
        if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
            raise StageConfigError(
                StageProblem(
                    f"must be a list of stages, not {type(raw).__name__}", name="config", field="stage_schedule",
                    value=raw,
                )
            )
        stages: list[Stage] = []
        # (index as written, stage) of the stages whose epoch range is well-formed: checked against each other
        # even when other fields have problems, so that every problem is reported at once
        ranged: list[tuple[int, Stage]] = []
        weighted: list[tuple[int, Stage]] = []
        for index, entry in enumerate(raw):
            stage, found = parse_stage(entry, index)
            problems += found
            if stage is not None:
                stages.append(stage)
                if not any(p.field in ("start_epoch", "end_epoch") for p in found):
                    ranged.append((index, stage))
                if stage.loss_weights is None or isinstance(stage.loss_weights, Mapping):
                    weighted.append((index, stage))
        object.__setattr__(self, "stages", tuple(stages))

        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, Mapping):
                problems.append(
                    _base_problem(
                        f"must be a mapping of loss name to weight, not {type(self.loss_weights).__name__}",
                        "loss_weights", self.loss_weights,
                    )
                )
            else:
                object.__setattr__(self, "loss_weights", dict(self.loss_weights))
                for key, weight in self.loss_weights.items():
                    problems += _check_base_number(weight, f"loss_weights.{key}")
        if self.distillation is not None and not isinstance(self.distillation, bool):
            problems.append(
                _base_problem(f"must be true or false, not {type(self.distillation).__name__}", "distillation",
                              self.distillation)
            )
        if self.lambda_coef is not None:
            problems += _check_base_number(self.lambda_coef, "lambda_coef")
        total_ok = self.total_epochs is None or (
            isinstance(self.total_epochs, int) and not isinstance(self.total_epochs, bool) and self.total_epochs >= 1
        )
        if not total_ok:
            problems.append(_base_problem("must be a positive integer", "total_epochs", self.total_epochs))

        problems += self._range_problems(ranged, check_total=total_ok)
        if self.loss_weights is None or isinstance(self.loss_weights, Mapping):
            problems += self._weight_key_problems(indexed=weighted)
        if problems:
            raise StageConfigError(problems)

        order = tuple(sorted(range(len(self.stages)), key=lambda i: self.stages[i].start_epoch))
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_starts", tuple(self.stages[i].start_epoch for i in order))

    # ------------------------------------------------------------------ checks

    def _range_problems(self, ranged: list[tuple[int, Stage]], check_total: bool = True) -> list[StageProblem]:
        problems = []
        ordered = sorted(ranged, key=lambda item: item[1].start_epoch)
        # compare each stage with every earlier-starting one that is still running, not only its neighbour:
        # [0, 10), [2, 4), [5, 8) has two overlaps
        for pos, (cur, b) in enumerate(ordered):
            for prev, a in ordered[:pos]:
                a_end = a.end_epoch if a.end_epoch is not None else math.inf
                if b.start_epoch < a_end:
                    a_range = f"[{a.start_epoch}, {a.end_epoch if a.end_epoch is not None else 'end'})"
                    problems.append(
                        StageProblem(
                            f"overlaps stage {prev}{f' ({a.name!r})' if a.name else ''} which covers epochs {a_range}",
                            index=cur, name=b.name, field="start_epoch", value=b.start_epoch,
                            hint=None if a.end_epoch is not None
                            else "a stage without `end_epoch` runs to the last epoch",
                        )
                    )
        if check_total and self.total_epochs is not None:
            problems += _starts_beyond(ranged, self.total_epochs, "total_epochs")
        return problems

    def _weight_key_problems(
        self, known: Optional[Sequence[str]] = None, indexed: Optional[list[tuple[int, Stage]]] = None
    ) -> list[StageProblem]:
        problems = []
        if known is None and self.loss_weights is not None:
            known = list(self.loss_weights)
        if known is not None:
            for index, stage in indexed if indexed is not None else enumerate(self.stages):
                for key, value in (stage.loss_weights or {}).items():
                    if key not in known:
                        hint = did_you_mean(key, known)
                        problems.append(
                            StageProblem(
                                "is not a task loss of this module",
                                index=index, name=stage.name, field=f"loss_weights.{key}", value=value,
                                hint=hint or (f"the task losses are: {', '.join(known)}" if known else
                                              "no task losses are declared: set `self.loss_weights` in the module"),
                            )
                        )
        return problems

    def missing_weight_problems(self) -> list[StageProblem]:
        """Without base weights, every stage must name every task loss that any stage names.

        Example::

            >>> s = StageSchedule([{"start_epoch": 0, "end_epoch": 1, "loss_weights": {"bce": 1}}, {"start_epoch": 1}])
            >>> print(s.missing_weight_problems()[0])
            stage 1: `loss_weights.bce` = None: is not set and has no base weight; give it in this stage or give base weights (`train.loss_weights`)
        """
        if self.loss_weights is not None:
            return []
        problems = []
        named = {key for stage in self.stages for key in (stage.loss_weights or {})}
        for index, stage in enumerate(self.stages):
            for key in sorted(named - set(stage.loss_weights or {})):
                problems.append(
                    StageProblem(
                        "is not set and has no base weight", index=index, name=stage.name,
                        field=f"loss_weights.{key}", value=None,
                        hint="give it in this stage or give base weights (`train.loss_weights`)",
                    )
                )
        return problems

    def epoch_problems(self, max_epochs: int, label: str = "max_epochs") -> list[StageProblem]:
        """Problems of this schedule under a run of ``max_epochs`` epochs: stages that would never run.

        Example::

            >>> [str(p) for p in StageSchedule([{"start_epoch": 0, "end_epoch": 5}, {"start_epoch": 5}]).epoch_problems(5)]
            ['stage 1: `start_epoch` = 5: starts at or beyond max_epochs (5), so it would never run']
        """
        return _starts_beyond(enumerate(self.stages), max_epochs, label)

    def weight_key_problems(self, loss_keys: Sequence[str]) -> list[StageProblem]:
        """Problems of weight keys that name no task loss in ``loss_keys`` (with a did-you-mean).

        Example::

            >>> s = StageSchedule([{"start_epoch": 0, "loss_weights": {"foacl": 1.0}}])
            >>> print(s.weight_key_problems(["bce", "focal"])[0])
            stage 0: `loss_weights.foacl` = 1.0: is not a task loss of this module; did you mean `focal`?
        """
        return self._weight_key_problems(list(loss_keys))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, source: Union[str, os.PathLike, Mapping[str, Any]]) -> StageSchedule:
        """Read a schedule in the seed's format from a JSON/YAML file or an already-loaded mapping.

        Reads the root-level ``stage_schedule`` and, as the base, ``train.loss_weights``, ``train.epochs``,
        ``distillation.enable`` and ``distillation.lambda_coef``. Other root keys are ignored. Without
        ``stage_schedule`` the schedule is the single-stage behaviour of the base settings.

        Raises:
            StageConfigError: with every problem in the config, or if the file cannot be read or parsed.

        Example::

            >>> s = StageSchedule.from_config({"train": {"epochs": 10, "loss_weights": {"bce": 1.0}},
            ...                                "distillation": {"enable": False, "lambda_coef": 0.5},
            ...                                "dataset": {"root": "ignored"}})
            >>> s.at(3).label, s.at(3).lambda_coef, s.needs_teachers
            ('base (no stage)', 0.5, False)
        """
        data = load_config(source) if not isinstance(source, Mapping) else source
        problems: list[StageProblem] = []

        def section(key: str) -> Mapping[str, Any]:
            value = data.get(key)
            if value is None:
                return {}
            if not isinstance(value, Mapping):
                problems.append(StageProblem(f"must be a mapping, not {type(value).__name__}", name="config",
                                             field=key, value=value))
                return {}
            return value

        # a misspelt `stage_schedule` would silently train single-stage: an error. Near-misses of the base keys
        # may be keys of an older config (`training`, `distillation.lambda`) that must keep working: a warning.
        root = _near_miss(data, _ROOT_KEYS, "")
        problems += [p for p in root if p.hint == "did you mean `stage_schedule`?"]
        train, distillation = section("train"), section("distillation")
        suspicious = [p for p in root if p not in problems]
        suspicious += _near_miss(train, _TRAIN_KEYS, "train.") + _near_miss(distillation, _DISTILLATION_KEYS, "distillation.")
        for problem in suspicious:
            warnings.warn(f"{problem} (ignored)", UserWarning, stacklevel=2)
        if problems:
            raise StageConfigError(problems)
        return cls(
            # only an absent (or null) `stage_schedule` means "no stages"; `{}` or `""` is a mistake the check names
            stages=data.get("stage_schedule") if data.get("stage_schedule") is not None else (),
            loss_weights=train.get("loss_weights"),
            distillation=distillation.get("enable"),
            lambda_coef=distillation.get("lambda_coef"),
            total_epochs=train.get("epochs"),
        )

    def with_base(
        self,
        loss_weights: Optional[Mapping[str, float]] = None,
        distillation: Optional[bool] = None,
        lambda_coef: Optional[float] = None,
        total_epochs: Optional[int] = None,
    ) -> StageSchedule:
        """A copy whose unset base settings are filled with the given ones (set ones are kept).

        Example::

            >>> StageSchedule().with_base(lambda_coef=0.5, total_epochs=3).at(0).lambda_coef
            0.5
        """
        return replace(
            self,
            loss_weights=self.loss_weights if self.loss_weights is not None else loss_weights,
            distillation=self.distillation if self.distillation is not None else distillation,
            lambda_coef=self.lambda_coef if self.lambda_coef is not None else lambda_coef,
            total_epochs=self.total_epochs if self.total_epochs is not None else total_epochs,
        )

    # ------------------------------------------------------------------ resolution

    @property
    def base_distillation(self) -> bool:
        """The base distillation flag (``False`` when not set)."""
        return bool(self.distillation)

    @property
    def base_lambda_coef(self) -> float:
        """The base distillation coefficient (``1.0`` when not set)."""
        return float(self.lambda_coef) if self.lambda_coef is not None else DEFAULT_LAMBDA_COEF

    @property
    def base_loss_weights(self) -> dict[str, float]:
        """The complete base weights: the given ones, or the stages' keys when no base is given."""
        if self.loss_weights is not None:
            return {k: float(v) for k, v in self.loss_weights.items()}
        return {}

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
        """The settings in force at ``epoch``. A pure function: same input, same output, no side effects.

        Args:
            epoch: the 0-based epoch (``trainer.current_epoch``).
            total_epochs: the end of stages that omit ``end_epoch``; defaults to the schedule's ``total_epochs``.

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
                    name=stage.name if stage.name is not None else f"stage_{index}",
                    index=index,
                    position=pos + 1,
                    num_stages=len(self.stages),
                    start_epoch=stage.start_epoch,
                    end_epoch=end,
                    distillation=stage.distillation if stage.distillation is not None else self.base_distillation,
                    lambda_coef=float(stage.lambda_coef) if stage.lambda_coef is not None else self.base_lambda_coef,
                    loss_weights=weights,
                )
        start, end = self._gap_around(epoch, total)
        return ResolvedStage(
            name=BASE_STAGE_NAME,
            index=None,
            position=None,
            num_stages=len(self.stages),
            start_epoch=start,
            end_epoch=end,
            distillation=self.base_distillation,
            lambda_coef=self.base_lambda_coef,
            loss_weights=weights,
        )

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
        """The epoch ranges ``[start, end)`` that no stage covers (``end`` ``None``: up to the last epoch).

        A schedule without stages covers nothing, and reports nothing: it is the single-stage behaviour.

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

    # ------------------------------------------------------------------ state

    def to_dict(self) -> dict[str, Any]:
        """The schedule in the seed's config format (plain data, safe to put in a checkpoint).

        Example::

            >>> StageSchedule.from_config(StageSchedule([{"start_epoch": 0}], lambda_coef=2.0).to_dict()).lambda_coef
            2.0
        """
        out: dict[str, Any] = {"stage_schedule": [stage.to_dict() for stage in self.stages]}
        train: dict[str, Any] = {}
        if self.loss_weights is not None:
            train["loss_weights"] = dict(self.loss_weights)
        if self.total_epochs is not None:
            train["epochs"] = self.total_epochs
        if train:
            out["train"] = train
        distillation: dict[str, Any] = {}
        if self.distillation is not None:
            distillation["enable"] = self.distillation
        if self.lambda_coef is not None:
            distillation["lambda_coef"] = self.lambda_coef
        if distillation:
            out["distillation"] = distillation
        return out

    def diff(self, other: StageSchedule) -> list[str]:
        """Human-readable differences from ``self`` to ``other``; empty when they resolve alike.

        Example::

            >>> a = StageSchedule([{"name": "d", "start_epoch": 0, "lambda_coef": 1.0}])
            >>> b = StageSchedule([{"name": "d", "start_epoch": 0, "lambda_coef": 0.5}])
            >>> a.diff(b)
            ["stage 0 ('d'): lambda_coef 1.0 -> 0.5"]
        """
        changes: list[str] = []
        for label, mine, theirs in (
            ("base loss_weights", self.loss_weights, other.loss_weights),
            ("base distillation", self.distillation, other.distillation),
            ("base lambda_coef", self.lambda_coef, other.lambda_coef),
            ("total_epochs", self.total_epochs, other.total_epochs),
        ):
            if mine != theirs:
                changes.append(f"{label} {mine!r} -> {theirs!r}")
        if len(self.stages) != len(other.stages):
            changes.append(f"number of stages {len(self.stages)} -> {len(other.stages)}")
        for index, (a, b) in enumerate(zip(self.stages, other.stages)):
            where = f"stage {index}" + (f" ({a.name!r})" if a.name is not None else "")
            da, db = a.to_dict(), b.to_dict()
            for key in ("name", "start_epoch", "end_epoch", "distillation", "lambda_coef", "loss_weights"):
                if da.get(key) != db.get(key):
                    changes.append(f"{where}: {key} {da.get(key)!r} -> {db.get(key)!r}")
        return changes
