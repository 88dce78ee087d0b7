"""Binding a schedule to what a module declares and to the run's length: a pure function, no Trainer, no module."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from lightning_stages.errors import StageConfigError, StageProblem
from lightning_stages.schedule import checks, unit_checks
from lightning_stages.schedule.adaptive_checks import min_length_problems
from lightning_stages.schedule.seed_format import ROOT_KEYS, config_path_problems, load_config
from lightning_stages.schedule.stage import BASE_STAGE_NAME, TOO_LARGE, plain, too_large
from lightning_stages.schedule.stage_schedule import StageSchedule

__all__ = ["bind_schedule", "declared_settings", "given_schedule", "run_of"]


def _plain_base(**values: Any) -> list[Any]:
    """:func:`plain` of each base setting; one that refers to itself is a problem of the base naming its key."""
    return [plain(value, field=key, name=BASE_STAGE_NAME) for key, value in values.items()]


def declared_settings(loss_weights: Any = None, distillation: Any = None, lambda_coef: Any = None) -> dict[str, Any]:
    """What a module declares, as :func:`bind_schedule` reads it: values of the wrong type count as not declared.

    Example::

        >>> declared_settings({"bce": 1}, distillation="yes", lambda_coef=0.5)
        {'loss_weights': {'bce': 1}, 'distillation': None, 'lambda_coef': 0.5}
    """
    loss_weights, distillation, lambda_coef = _plain_base(loss_weights=loss_weights, distillation=distillation,
                                                          lambda_coef=lambda_coef)
    return {
        "loss_weights": dict(loss_weights) if isinstance(loss_weights, Mapping) else None,
        "distillation": distillation if isinstance(distillation, bool) else None,
        "lambda_coef": lambda_coef if isinstance(lambda_coef, (int, float)) and not isinstance(lambda_coef, bool)
        else None,
    }


def bind_schedule(
    schedule: StageSchedule,
    *,
    declared: Optional[Mapping[str, Any]] = None,
    weight_overrides: Optional[Mapping[str, float]] = None,
    max_epochs: Optional[int] = None,
    max_steps: Optional[int] = None,
) -> StageSchedule:
    """The schedule with every base setting filled in: what a run of ``max_epochs`` epochs (or ``max_steps``
    optimizer steps) of a module trains with.

    * base loss weights: the module's declared ``loss_weights``, overridden key by key by the schedule's own
      ``loss_weights`` and then by ``weight_overrides`` (the callback's ``loss_weights``); without a declaration,
      those two alone. Overrides must name task losses the module declared.
    * base ``distillation`` and ``lambda_coef``: the schedule's, else the module's.
    * ``total_epochs``: the schedule's, else ``max_epochs`` (stages without ``end_epoch`` end with the run);
      ``total_steps`` the same with ``max_steps`` (step stages without ``end_step`` end with the run).

    The schedule given is already checked; only what binding adds is checked here, once.

    Args:
        schedule: the schedule as given (e.g. ``StageSchedule.from_config(path)``).
        declared: what the module declared, keys ``loss_weights``, ``distillation`` and ``lambda_coef`` (see
            :func:`declared_settings`); ``None``: nothing.
        weight_overrides: base weights that override the declared ones key by key.
        max_epochs: the run's epochs (``None``: unbounded).
        max_steps: the run's optimizer steps (``None``: unbounded).

    Raises:
        StageConfigError: override keys the module does not declare, stage weight keys that name no task loss,
            task losses without a base weight, stages that start at or after ``max_epochs`` (``max_steps``), ramps
            or ``min_epochs`` (``min_steps``) longer than a stage that ends with the run, a step schedule whose
            ``data`` changes, bad declared values, all together.

    Example::

        >>> schedule = StageSchedule([{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True,
        ...                            "loss_weights": {"bce": 0}}])
        >>> bound = bind_schedule(schedule, declared={"loss_weights": {"bce": 1.0, "dice": 1.0}, "lambda_coef": 0.5},
        ...                       weight_overrides={"dice": 3.0}, max_epochs=4)
        >>> [(r.name, r.end_epoch, r.lambda_coef, r.loss_weights) for r in bound.timeline()]
        [('kd', 2, 0.5, {'bce': 0.0, 'dice': 3.0}), ('base', 4, 0.5, {'bce': 1.0, 'dice': 3.0})]
        >>> bind_schedule(schedule, declared={"loss_weights": {"bc": 1.0}})
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem in the stage schedule:
          - stage 0 ('kd'): `loss_weights.bce` = 0: is not a task loss of this module; did you mean `bc`?
    """
    declared = declared_settings(**{key: (declared or {}).get(key) for key in ("loss_weights", "distillation",
                                                                                "lambda_coef")})
    max_epochs, max_steps, weight_overrides = plain(max_epochs), plain(max_steps), plain(weight_overrides)  # numpy
    for field, limit in (("max_epochs", max_epochs), ("max_steps", max_steps)):
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise StageConfigError(StageProblem("must be an integer or None", name=BASE_STAGE_NAME, field=field,
                                                value=limit))
    if weight_overrides is not None and not isinstance(weight_overrides, Mapping):
        raise StageConfigError(StageProblem("must be a mapping of task losses to weights", name=BASE_STAGE_NAME,
                                            field="loss_weights", value=weight_overrides))
    overrides: Optional[dict[str, Any]] = None
    if schedule.loss_weights is not None or weight_overrides is not None:
        overrides = {**(schedule.loss_weights or {}), **(weight_overrides or {})}
    problems: list[StageProblem] = []
    known = declared["loss_weights"]
    base_weights = overrides
    if known is not None:
        problems += checks.unknown_loss_problems(overrides or {}, list(known), name=BASE_STAGE_NAME,
                                                 listing="the module's task losses are",
                                                 when_none="the module's task losses are: (none)")
        base_weights = {**known, **{k: v for k, v in (overrides or {}).items() if k in known}}
    distillation = schedule.distillation if schedule.distillation is not None else declared["distillation"]
    lambda_coef = schedule.lambda_coef if schedule.lambda_coef is not None else declared["lambda_coef"]
    total = schedule.total_epochs if schedule.total_epochs is not None else max_epochs
    total_steps = schedule.total_steps if schedule.total_steps is not None else max_steps
    problems += checks.base_problems(base_weights, distillation, lambda_coef, total)
    if too_large(total_steps):  # as the run's epochs are (base_problems)
        problems.append(StageProblem(TOO_LARGE, name=BASE_STAGE_NAME, value=total_steps,
                                     field="total_steps" if schedule.total_steps is not None else "max_steps"))
    if base_weights is not None:
        problems += schedule.weight_key_problems(list(base_weights))
    problems += checks.missing_weight_problems(schedule.stages, base_weights)
    if max_epochs is not None:
        problems += schedule.epoch_problems(max_epochs)
    if max_steps is not None:
        problems += schedule.epoch_problems(max_steps, "max_steps")
    problems += unit_checks.ramp_length_problems(enumerate(schedule.stages),
                                                 total if schedule.unit == "epoch" else total_steps)
    # a stage without `end_epoch` (`end_step`) ends with the run: only now is its length known
    problems += min_length_problems([(i, s) for i, s in enumerate(schedule.stages) if s.end is None],
                                    total if schedule.unit == "epoch" else total_steps)
    if problems:
        raise StageConfigError(problems)
    return StageSchedule._checked_elsewhere(schedule.stages, base_weights, distillation, lambda_coef, total,
                                            total_steps)


def run_of(schedule: StageSchedule, run_epochs: Optional[int], run_steps: Optional[int] = None) -> StageSchedule:
    """A bound ``schedule`` as a run of ``run_epochs`` epochs (a step schedule: ``run_steps`` optimizer steps) trains
    it, for ``show`` and ``validate``: where the run's length differs from the schedule's own (a seed file's
    ``train.epochs`` or ``train.max_steps``), its open stages still end there, as in ``fit``: a longer run trains the
    base settings after them, a shorter one cuts them short.

    Example::

        >>> bound = StageSchedule([{"name": "b", "start_epoch": 0}], total_epochs=5)
        >>> [(r.name, r.start_epoch, r.end_epoch) for r in run_of(bound, 6).timeline()]
        [('b', 0, 5), ('base', 5, 6)]
        >>> steps = StageSchedule([{"name": "b", "start_step": 0}], total_steps=6)
        >>> [(r.name, r.start_epoch, r.end_epoch) for r in run_of(steps, None, 10).timeline()]
        [('b', 0, 6), ('base', 6, 10)]
    """
    step = schedule.unit == "step"
    total, run = (schedule.total_steps, run_steps) if step else (schedule.total_epochs, run_epochs)
    if run is None or total is None or run == total:
        return schedule
    stages = [s if (s.end_step if step else s.end_epoch) is not None else
              dataclasses.replace(s, end_step=total) if step else dataclasses.replace(s, end_epoch=total)
              for s in schedule.stages]
    return StageSchedule._checked_elsewhere(stages, schedule.loss_weights, schedule.distillation, schedule.lambda_coef,
                                            schedule.total_epochs if step else run, run if step else schedule.total_steps)


def given_schedule(
    stage_schedule: Optional[Sequence[Any]] = None,
    config: Union[str, os.PathLike, None] = None,
    loss_weights: Optional[Mapping[str, float]] = None,
    distillation: Optional[bool] = None,
    lambda_coef: Optional[float] = None,
    *,
    owner: str = "StageScheduleCallback",
) -> tuple[StageSchedule, Optional[dict[str, float]]]:
    """The schedule and the base weight overrides that :class:`~lightning_stages.StageScheduleCallback`'s
    arguments give, checked once: what :func:`bind_schedule` takes.

    ``config`` (a seed-format file) gives the stages, the base and ``train.epochs``; the other arguments override its
    base. The weight overrides are kept apart from the schedule: they override the module's declared weights key by
    key, which only binding knows.

    Raises:
        StageConfigError: both ``stage_schedule`` and ``config``, a ``config`` that is not a path, or any problem of
            the schedule, all together.

    Example::

        >>> schedule, overrides = given_schedule([{"start_epoch": 0, "distillation": True}], loss_weights={"bce": 2})
        >>> len(schedule.stages), schedule.loss_weights, overrides
        (1, None, {'bce': 2})
    """
    if stage_schedule is not None and config is not None:
        raise StageConfigError(StageProblem("give either `stage_schedule` or `config`, not both", name=owner,
                                            field="config", value=str(config)))
    # numpy (or tensor) scalars count as the numbers they hold, as in the stages
    loss_weights, distillation, lambda_coef = _plain_base(loss_weights=loss_weights, distillation=distillation,
                                                          lambda_coef=lambda_coef)
    problems = checks.base_problems(loss_weights=loss_weights)
    if config is not None:
        if not_a_path := config_path_problems(config, name=owner):
            raise StageConfigError(not_a_path)
        data = load_config(config)
        from_file = StageSchedule.from_config(data)  # a misspelt `stage_schedule` is named there first
        if not any(key in data for key in ROOT_KEYS):  # nothing of a schedule: it would train single-stage, silently
            raise StageConfigError(StageProblem(
                f"holds none of {', '.join(ROOT_KEYS)}: no schedule to read", name=owner, field="config",
                value=os.fspath(config), hint="an empty file, or a LightningCLI config (which gives the callback in "
                "trainer.callbacks)? give a file in the seed's format, with `stage_schedule`"))
        if from_file.loss_weights is not None or loss_weights is not None:
            loss_weights = {**(from_file.loss_weights or {}), **(loss_weights or {})}
        problems += checks.base_problems(distillation=distillation, lambda_coef=lambda_coef)
        if problems:
            raise StageConfigError(problems)
        schedule = StageSchedule._checked_elsewhere(
            from_file.stages, None, distillation if distillation is not None else from_file.distillation,
            lambda_coef if lambda_coef is not None else from_file.lambda_coef, from_file.total_epochs,
            from_file.total_steps,
        )
    else:
        if stage_schedule is not None:
            not_a_list = checks.stage_list_problems(stage_schedule, name=owner)
            if not_a_list:
                raise StageConfigError(not_a_list)
        try:
            schedule = StageSchedule(stages=tuple(stage_schedule or ()), distillation=distillation,
                                     lambda_coef=lambda_coef)
        except StageConfigError as err:
            problems += err.problems
        if problems:
            raise StageConfigError(problems)
    return schedule, dict(loss_weights) if loss_weights is not None else None
