"""Every check of a schedule, each a function returning ``list[StageProblem]`` (empty: nothing wrong).

One check per kind of mistake, one message for it: the schedule, the seed's format, the binding to a module and
the callback all call these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional

from lightning_stages.errors import StageConfigError, StageProblem, did_you_mean
from lightning_stages.schedule.adaptive_checks import adaptive_problems
from lightning_stages.schedule.stage import BASE_STAGE_NAME, STAGE_FIELDS, TOO_LARGE, Stage, too_large
from lightning_stages.schedule.unit_checks import overlap_problems  # re-exported: checked with the others

__all__ = [
    "base_problems",
    "missing_weight_problems",
    "near_miss_problems",
    "number_problems",
    "overlap_problems",
    "parse_stage",
    "stage_list_problems",
    "stage_problems",
    "stage_weight_key_problems",
    "starts_beyond_problems",
    "unknown_loss_problems",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_problems(value: Any, field: str, *, index: Optional[int] = None, name: Optional[str] = None
                    ) -> list[StageProblem]:
    """A weight or coefficient must be a finite number ``>= 0``.

    Example::

        >>> [str(p) for p in number_problems(-1, "lambda_coef", index=0)]
        ['stage 0: `lambda_coef` = -1: must be >= 0']
        >>> number_problems(0.5, "lambda_coef")
        []
    """
    if not _is_real(value):
        message = f"must be a number, not {type(value).__name__}"
    elif too_large(value):  # math.isfinite would overflow
        message = TOO_LARGE
    elif not math.isfinite(value):
        message = "must be finite"
    elif value < 0:
        message = "must be >= 0"
    else:
        return []
    return [StageProblem(message, index=index, name=name, field=field, value=value)]


def stage_list_problems(value: Any, *, name: str = "config", field: str = "stage_schedule") -> list[StageProblem]:
    """``stage_schedule`` must be a list (a sequence that is not a string or a mapping).

    Example::

        >>> print(stage_list_problems({"start_epoch": 0})[0])
        config: `stage_schedule` = {'start_epoch': 0}: must be a list of stages, not dict
    """
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        return [StageProblem(f"must be a list of stages, not {type(value).__name__}", name=name, field=field,
                             value=value)]
    return []


def unknown_loss_problems(
    weights: Mapping[str, Any], known: Sequence[str], *, index: Optional[int] = None, name: Optional[str] = None,
    listing: str = "the task losses are", when_none: str = "no task losses are declared: set `self.loss_weights` in "
    "the module",
) -> list[StageProblem]:
    """Weight keys that name no task loss of the module, each with a "did you mean" or the list of task losses.

    Example::

        >>> print(unknown_loss_problems({"foacl": 1.0}, ["bce", "focal"], index=0)[0])
        stage 0: `loss_weights.foacl` = 1.0: is not a task loss of this module; did you mean `focal`?
    """
    return [
        StageProblem("is not a task loss of this module", index=index, name=name, field=f"loss_weights.{key}",
                     value=value, hint=did_you_mean(str(key), known)
                     or (f"{listing}: {', '.join(map(str, known))}" if known else when_none))
        for key, value in weights.items() if key not in known
    ]


def stage_weight_key_problems(indexed: Iterable[tuple[int, Stage]], known: Sequence[str]) -> list[StageProblem]:
    """:func:`unknown_loss_problems` of every stage (``(index as written, stage)``).

    Example::

        >>> [p.field for p in stage_weight_key_problems([(0, Stage(start_epoch=0, loss_weights={"x": 1}))], ["bce"])]
        ['loss_weights.x']
    """
    return [problem for index, stage in indexed
            for problem in unknown_loss_problems(stage.loss_weights or {}, known, index=index, name=stage.name)]


def stage_problems(stage: Stage, index: int) -> list[StageProblem]:
    """Check one stage's own fields (types and ranges). Problems between stages are the schedule's.

    Example::

        >>> [str(p) for p in stage_problems(Stage(start_epoch=5, end_epoch=2), 0)]
        ['stage 0: `end_epoch` = 2: must be greater than `start_epoch` (5)']
    """
    name = stage.name if isinstance(stage.name, str) else None

    def problem(message: str, field_name: str, value: Any) -> StageProblem:
        return StageProblem(message, index=index, name=name, field=field_name, value=value)

    problems: list[StageProblem] = []
    if stage.name is not None and not isinstance(stage.name, str):
        problems.append(problem(f"must be a string, not {type(stage.name).__name__}", "name", stage.name))
    if stage.start_epoch is None and stage.start_step is None:
        problems.append(problem("is required", f"start_{stage.unit}", None))  # start_step: :mod:`.unit_checks`
    elif stage.start_epoch is None:
        pass
    elif not _is_int(stage.start_epoch):
        problems.append(
            problem(f"must be an integer, not {type(stage.start_epoch).__name__}", "start_epoch", stage.start_epoch)
        )
    elif stage.start_epoch < 0:
        problems.append(problem("must be >= 0", "start_epoch", stage.start_epoch))
    elif too_large(stage.start_epoch):
        problems.append(problem(TOO_LARGE, "start_epoch", stage.start_epoch))
    if stage.end_epoch is not None:
        if not _is_int(stage.end_epoch):
            problems.append(
                problem(f"must be an integer, not {type(stage.end_epoch).__name__}", "end_epoch", stage.end_epoch)
            )
        elif too_large(stage.end_epoch):
            problems.append(problem(TOO_LARGE, "end_epoch", stage.end_epoch))
        elif isinstance(stage.start_epoch, int) and stage.end_epoch <= stage.start_epoch:
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
        problems += number_problems(stage.lambda_coef, "lambda_coef", index=index, name=name)
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
                problems += number_problems(weight, f"loss_weights.{key}", index=index, name=name)
    problems += adaptive_problems(stage, index)
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
    try:
        stage = Stage(**known)
    except StageConfigError as err:  # a value that refers to itself or nests too deeply
        return None, problems + [replace(p, index=index, name=name) for p in err.problems]
    problems += stage_problems(stage, index)
    return stage, problems


def base_problems(
    loss_weights: Any = None, distillation: Any = None, lambda_coef: Any = None, total_epochs: Any = None
) -> list[StageProblem]:
    """Problems of the base settings (``None``: not set, nothing to check).

    Example::

        >>> [str(p) for p in base_problems(loss_weights={"bce": "x"}, total_epochs=0)]
        ["base: `loss_weights.bce` = 'x': must be a number, not str", 'base: `total_epochs` = 0: must be a positive integer']
    """
    problems: list[StageProblem] = []
    if loss_weights is not None:
        if not isinstance(loss_weights, Mapping):
            problems.append(
                StageProblem(f"must be a mapping of loss name to weight, not {type(loss_weights).__name__}",
                             name=BASE_STAGE_NAME, field="loss_weights", value=loss_weights)
            )
        else:
            for key, weight in loss_weights.items():
                if not isinstance(key, str):  # as in a stage (e.g. YAML's `yes:` or `null:`, read as True or None)
                    problems.append(StageProblem("loss names must be strings", name=BASE_STAGE_NAME,
                                                 field="loss_weights", value=key))
                    continue
                problems += number_problems(weight, f"loss_weights.{key}", name=BASE_STAGE_NAME)
    if distillation is not None and not isinstance(distillation, bool):
        problems.append(StageProblem(f"must be true or false, not {type(distillation).__name__}",
                                     name=BASE_STAGE_NAME, field="distillation", value=distillation))
    if lambda_coef is not None:
        problems += number_problems(lambda_coef, "lambda_coef", name=BASE_STAGE_NAME)
    if too_large(total_epochs):
        problems.append(StageProblem(TOO_LARGE, name=BASE_STAGE_NAME, field="total_epochs", value=total_epochs))
    elif total_epochs is not None and not (_is_int(total_epochs) and total_epochs >= 1):
        problems.append(StageProblem("must be a positive integer", name=BASE_STAGE_NAME, field="total_epochs",
                                     value=total_epochs))
    return problems


def starts_beyond_problems(indexed: Iterable[tuple[int, Stage]], max_epochs: int, label: str = "max_epochs"
                           ) -> list[StageProblem]:
    """Stages (with their index as written) that start at or after ``max_epochs`` and so would never run.

    Example::

        >>> [str(p) for p in starts_beyond_problems([(1, Stage(start_epoch=5))], 5)]
        ['stage 1: `start_epoch` = 5: starts at or beyond max_epochs (5), so it would never run']
    """
    unit = "step" if label in ("max_steps", "total_steps") else "epoch"
    return [
        StageProblem(
            f"starts at or beyond {label} ({max_epochs}), so it would never run",
            index=index, name=stage.name, field=f"start_{unit}", value=stage.start,
        )
        for index, stage in indexed
        if stage.unit == unit and _is_int(stage.start) and stage.start >= max_epochs
    ]


def missing_weight_problems(stages: Sequence[Stage], base_weights: Optional[Mapping[str, Any]]) -> list[StageProblem]:
    """Without base weights, every stage must name every task loss that any stage names.

    Example::

        >>> stages = [Stage(start_epoch=0, end_epoch=1, loss_weights={"bce": 1}), Stage(start_epoch=1)]
        >>> print(missing_weight_problems(stages, None)[0])
        stage 1: `loss_weights.bce` = None: is not set and has no base weight; give it in this stage or give base weights (`train.loss_weights`)
    """
    if base_weights is not None:
        return []
    named = {key for stage in stages for key in (stage.loss_weights or {})}
    return [
        StageProblem("is not set and has no base weight", index=index, name=stage.name, field=f"loss_weights.{key}",
                     value=None, hint="give it in this stage or give base weights (`train.loss_weights`)")
        for index, stage in enumerate(stages)
        for key in sorted(named - set(stage.loss_weights or {}))
    ]


def near_miss_problems(section: Mapping[str, Any], wanted: Sequence[str], prefix: str) -> list[StageProblem]:
    """Keys of a config section that look like a misspelling of a key that is read, when the real key is absent.

    Example::

        >>> print(near_miss_problems({"stage_schedul": []}, ["stage_schedule", "train"], "")[0])
        config: `stage_schedul` = []: is not a key the schedule reads; did you mean `stage_schedule`?
    """
    problems = []
    for key in section:
        if not isinstance(key, str) or key in wanted:
            continue
        hint = did_you_mean(key, [w for w in wanted if w not in section])
        if hint is not None:
            problems.append(StageProblem("is not a key the schedule reads", name="config", field=prefix + key,
                                         value=section[key], hint=hint))
    return problems
