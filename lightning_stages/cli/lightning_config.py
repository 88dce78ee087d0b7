"""Reading a config without training: the schedule it trains with, and what else two configs differ in.

A config is either the seed's format (root ``stage_schedule``, ``train``, ``distillation``) or a ``LightningCLI``
YAML whose ``trainer.callbacks`` hold a :class:`~lightning_stages.StageScheduleCallback`; the base settings of a
LightningCLI config are what its model, built from the config, declares, as the callback takes them from the module
(:mod:`~lightning_stages.cli.declared_weights`). Every problem is raised as the library's :class:`~lightning_stages.StageConfigError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from lightning_stages.adaptive_stages import restore_best_problems
from lightning_stages.best_weights import best_weights_problem
from lightning_stages.cli.config_problems import averaging_callbacks, more_schedules_problem, two_schedules_problem
from lightning_stages.cli.declared_weights import as_the_parser_reads, declared_by_model, import_class_path
from lightning_stages.cli.nested_files import with_nested_trainer
from lightning_stages.errors import StageConfigError, StageProblem, did_you_mean, flag_problem
from lightning_stages.schedule import StageSchedule, bind_schedule
from lightning_stages.schedule.bind import given_schedule, run_of
from lightning_stages.schedule.seed_format import ROOT_KEYS, load_config
from lightning_stages.stage_schedule_callback import StageScheduleCallback

__all__ = [
    "add_working_directory_to_path",
    "check_lightning_config",
    "more_schedules_problem",
    "schedule_of_config",
    "two_schedules_problem",
]

_CALLBACK_NAME = StageScheduleCallback.__name__
# the problem that only the module's declared weights can decide (schedule.checks.missing_weight_problems)
_NO_BASE_WEIGHT = "is not set and has no base weight"
# the problem of a stage weight that the module's weights (here: the callback's own, the module's being unknown) lack
_NOT_A_TASK_LOSS = "is not a task loss of this module"
# model settings that belong to the schedule, not to the model: the base the callback takes from the module, and
# what is left out when judging whether two configs compare like for like
_SCHEDULE_MODEL_KEYS = ("loss_weights", "use_distillation", "lambda_coef")


def add_working_directory_to_path() -> None:
    """Let class paths in configs resolve from the working directory, as with ``python -m``."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _is_lightning_config(data: Mapping[str, Any]) -> bool:
    """A LightningCLI config has ``trainer`` or ``fit``; one with only ``model``/``data`` is one unless it has a root
    key of the seed's format (whose schedule would otherwise go unchecked)."""
    if "trainer" in data or "fit" in data:
        return True
    return any(key in data for key in ("model", "data")) and not any(key in data for key in ROOT_KEYS)


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


def _fit_section(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``fit`` section of a ``LightningCLI`` config that has one (the config itself otherwise)."""
    fit = data.get("fit")
    return fit if isinstance(fit, Mapping) else data


def _callback_entries(data: Mapping[str, Any], import_modules: bool = True
                      ) -> tuple[list[tuple[int, dict[str, Any], type]], list[StageProblem]]:
    """``(position in trainer.callbacks, init_args, class)`` of every StageScheduleCallback in a LightningCLI config, and
    the problems of class paths that cannot be imported. Without ``import_modules``, a callback is recognised by its
    class name alone (``StageScheduleCallback`` or ``<anything>.StageScheduleCallback``) and nothing is imported."""
    found: list[tuple[int, dict[str, Any], type]] = []
    problems: list[StageProblem] = []
    trainer = _fit_section(data).get("trainer")
    if trainer is not None and not isinstance(trainer, Mapping):  # LightningCLI's parser refuses it
        problems.append(StageProblem(f"must be a mapping of Trainer arguments, not {type(trainer).__name__}",
                                     name="config", field="trainer", value=trainer))
    callbacks = _section(_fit_section(data), "trainer").get("callbacks")
    if isinstance(callbacks, (Mapping, str)):
        callbacks = [callbacks]
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        return found, [*problems, StageProblem(f"must be a list of callbacks, not {type(callbacks).__name__}",
                                               name="config", field="trainer.callbacks", value=callbacks)]
    for position, entry in enumerate(callbacks or []):
        if isinstance(entry, str):
            class_path: Any = entry
        else:
            class_path = entry.get("class_path") if isinstance(entry, Mapping) else None
        if not isinstance(class_path, str):  # LightningCLI's parser refuses a callback it cannot build
            problems.append(StageProblem("has no `class_path` (a callback is a class path, or a mapping of "
                                         "`class_path` and `init_args`)", name="config",
                                         field=f"trainer.callbacks[{position}]", value=entry))
            continue
        cls = None
        if not import_modules:
            cls = StageScheduleCallback if class_path.rpartition(".")[2] == _CALLBACK_NAME else None
        elif class_path != _CALLBACK_NAME and "." in class_path:
            cls, failed = import_class_path(class_path, f"trainer.callbacks[{position}].class_path")
            problems += failed
        if class_path == _CALLBACK_NAME or (isinstance(cls, type) and issubclass(cls, StageScheduleCallback)):
            init_args = entry.get("init_args") if isinstance(entry, Mapping) else None
            # LightningCLI's parser refuses any other key in a callback's entry (arguments go under init_args)
            problems += [StageProblem("is not a key of a callback entry; the callback's arguments go under `init_args`",
                                      name="config", field=f"trainer.callbacks[{position}].{key}", value=entry[key],
                                      hint=did_you_mean(str(key), ["class_path", "init_args"]))
                         for key in (entry if isinstance(entry, Mapping) else ()) if key not in ("class_path", "init_args")]
            if init_args is not None and not isinstance(init_args, Mapping):
                problems.append(StageProblem(f"must be a mapping of arguments, not {type(init_args).__name__}",
                                             name="config", field=f"trainer.callbacks[{position}].init_args",
                                             value=init_args))
                continue
            found.append((position, dict(init_args or {}), cls if isinstance(cls, type) else StageScheduleCallback))
    return found, problems


def _callback_schedule(init_args: Mapping[str, Any], position: int,
                       cls: type[StageScheduleCallback] = StageScheduleCallback
                       ) -> tuple[StageSchedule, Optional[dict[str, float]]]:
    """The schedule and weight overrides ``StageScheduleCallback(**init_args)`` would hold, built without it; unknown
    arguments reported like any other schedule problem. A subclass ``cls`` is built (its ``__init__`` may take other
    arguments, or give the schedule itself), as ``fit`` builds it."""
    where = f"trainer.callbacks[{position}] ({cls.__name__})"
    parameters = inspect.signature(cls.__init__).parameters  # a subclass's own (**kwargs: any name)
    accepted = [p for p in parameters if p != "self" and parameters[p].kind != inspect.Parameter.VAR_KEYWORD]
    problems = [
        StageProblem(f"is not an argument of {cls.__name__}", name=where, field=str(key), value=value,
                     hint=did_you_mean(str(key), accepted) or f"the arguments are: {', '.join(accepted)}")
        for key, value in init_args.items() if key not in accepted and len(accepted) + 1 == len(parameters)
    ]
    if cls is not StageScheduleCallback:
        if problems:
            raise StageConfigError(problems)
        try:
            built = cls(**as_the_parser_reads(cls, init_args))
        except StageConfigError:
            raise
        except Exception as err:  # the user's __init__: its arguments or its own code
            raise StageConfigError(StageProblem(f"cannot be built from its init_args ({type(err).__name__}: {err})",
                                                name=where, field="init_args", value=dict(init_args))) from None
        return built.schedule, built.base_loss_weights
    if "best_weights" in init_args and (problem := best_weights_problem(init_args["best_weights"], where)):
        problems.append(problem)
    verbose = as_the_parser_reads(StageScheduleCallback, {"verbose": init_args.get("verbose", True)})["verbose"]
    if problem := flag_problem(verbose, "verbose", where):  # the parser reads "true" as True, and refuses "maybe"
        problems.append(problem)
    # the arguments that shape the schedule (`verbose` and `best_weights` do not)
    shaping = [p for p in inspect.signature(given_schedule).parameters if p in accepted]
    try:
        given = given_schedule(**{k: v for k, v in init_args.items() if k in shaping})
    except StageConfigError:
        # checked again as LightningCLI's parser reads the values (it converts a YAML "0.5" where a float is typed)
        try:
            parsed = as_the_parser_reads(StageScheduleCallback, init_args)
            given = given_schedule(**{k: v for k, v in parsed.items() if k in shaping})
        except StageConfigError as err:
            raise StageConfigError([*problems, *err.problems]) from None
    if problems:
        raise StageConfigError(problems)
    return given


def check_lightning_config(data: Mapping[str, Any], import_modules: bool = True
                           ) -> list[tuple[StageSchedule, Optional[dict[str, float]]]]:
    """Check every ``StageScheduleCallback`` of a LightningCLI config without building it, raising the library's
    error for bad ones; those of its ``validate``, ``test`` and ``predict`` sections too.

    Callback class paths other than ``StageScheduleCallback`` are imported (running the module's top-level code) to
    find subclasses of it; ``import_modules=False`` imports nothing and recognises the callback by its class name.

    Returns:
        ``(schedule, weight overrides)`` of each callback of the ``fit`` run, as
        :func:`~lightning_stages.schedule.bind.bind_schedule` takes them.

    Raises:
        StageConfigError: a schedule problem (each naming stage, field and value), a callback ``class_path`` that
            cannot be imported, or more than one callback.

    Example::

        >>> cfg = {"trainer": {"callbacks": [{"class_path": "lightning_stages.StageScheduleCallback",
        ...        "init_args": {"stage_schedule": [{"name": "warm", "start_epoch": 0, "lamda_coef": 0.5}]}}]}}
        >>> check_lightning_config(cfg)
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem in the stage schedule:
          - stage 0 ('warm'): `lamda_coef` = 0.5: is not a stage field; did you mean `lambda_coef`?
    """
    entries, problems = _callback_entries(data, import_modules)
    given = []
    for position, init_args, cls in entries:
        try:
            given.append(_callback_schedule(init_args, position, cls))
        except StageConfigError as err:
            problems += err.problems
    if len(entries) > 1:
        problems.append(more_schedules_problem([p for p, _, _ in entries]))
    for key in ("validate", "test", "predict"):  # LightningCLI's parser reads these sections whatever it runs
        try:
            if isinstance(data.get(key), Mapping):
                check_lightning_config(data[key], import_modules)
        except StageConfigError as err:
            problems += [dataclasses.replace(p, message=f"{p.message} (in the `{key}` section)") for p in err.problems]
    if problems:
        raise StageConfigError(problems)
    return given


def _max_epochs_of(data: Mapping[str, Any], key: str = "max_epochs") -> Optional[int]:
    value = _section(_fit_section(data), "trainer").get(key)
    if isinstance(value, str):  # LightningCLI's parser reads a YAML "9" where an int is typed as 9
        with contextlib.suppress(ValueError):
            value = int(value)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):  # the parser refuses it too
        raise StageConfigError(StageProblem("must be an integer or null", name="config", field=f"trainer.{key}",
                                            value=value))
    if value is not None and value < -1:  # the Trainer refuses it when the fit starts
        raise StageConfigError(StageProblem("must be a non-negative integer or -1 (no limit)", name="config",
                                            field=f"trainer.{key}", value=value))
    return value if value is not None and value >= 0 else None


def _epochs_by_default(data: Mapping[str, Any]) -> bool:
    """Whether the Trainer sets ``max_epochs = 1000`` (no max_epochs, max_steps or max_time: ``_parse_loop_limits``)."""
    trainer = _section(_fit_section(data), "trainer")
    return trainer.get("max_epochs") is None and _max_epochs_of(data, "max_steps") is None and trainer.get("max_time") is None


def schedule_of_config(
    path: Union[str, os.PathLike], max_epochs: Optional[int] = None, stages: Union[str, os.PathLike, None] = None,
    model_class: Optional[str] = None, import_modules: bool = True,
) -> StageSchedule:
    """The schedule a config trains with, every base setting resolved, checked the way ``fit`` would check it.

    Reads the seed's format (``stage_schedule``, ``train``, ``distillation``) or a LightningCLI YAML with a
    :class:`~lightning_stages.StageScheduleCallback` in ``trainer.callbacks`` (a YAML without one is the plain
    single-stage run). The base loss weights, ``use_distillation`` and ``lambda_coef`` are what the module built from
    the config declares, as the callback takes them from the module at ``fit``
    (:func:`~lightning_stages.cli.declared_weights.declared_by_model`; ``configure_teachers`` is not run).

    Args:
        path: the config file.
        max_epochs: the run's epochs; defaults to ``trainer.max_epochs`` or the seed's ``train.epochs``. The run's
            optimizer steps (which end the stages of a step schedule) are ``trainer.max_steps`` or the seed's
            ``train.max_steps``.
        stages: a schedule in the seed's format to use with a LightningCLI config (its ``--stages`` option).
        model_class: the model's class path for a ``LightningCLI(MyModel, MyData)`` config, whose ``model`` section
            has no ``class_path`` (the ``--model`` option).

        import_modules: import the modules a LightningCLI config's ``class_path`` names (running their top-level
            code), as ``fit`` would, to read the model's ``__init__`` defaults and recognise callback subclasses.
            ``False`` (``--no-import``, for untrusted configs) imports nothing and checks what can be checked
            statically: the schedule itself, the callback's arguments, the model's ``init_args`` and the epochs;
            without ``loss_weights`` in the model's ``init_args``, the weight keys are not checked against the model.

    Warns:
        DeclaredWeightsWarning: the module's declared weights could not be read as training reads them (no model
            class, or building it failed); the rest is checked.

    Raises:
        StageConfigError: every problem, each naming stage, field and value.

    Example::

        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.json"
        >>> _ = p.write_text('{"train": {"epochs": 6, "loss_weights": {"bce": 1, "cls": 1}},'
        ...                  ' "stage_schedule": [{"name": "kd", "start_epoch": 0, "end_epoch": 2,'
        ...                  ' "distillation": true, "loss_weights": {"bce": 0}}]}')
        >>> [(r.name, r.start_epoch, r.end_epoch, r.loss_weights["bce"]) for r in schedule_of_config(p).timeline()]
        [('kd', 0, 2, 0.0), ('base', 2, 6, 1.0)]
    """
    data = load_config(path)
    if _is_lightning_config(data):
        data = with_nested_trainer(data, Path(path).parent)  # trainer: trainer.yaml
    else:
        schedule = StageSchedule.from_config(data)
        if stages is not None:
            raise StageConfigError(StageProblem("`--stages` goes with a LightningCLI config, not a schedule file",
                                                name="config", field="stages", value=str(stages)))
        if model_class is not None:  # a schedule file builds no model: the class would be ignored without a word
            raise StageConfigError(StageProblem("`--model` goes with a LightningCLI config, not a schedule file",
                                                name="config", field="model", value=str(model_class)))
        total = max_epochs if max_epochs is not None else schedule.total_epochs
        # the seed's own train.loss_weights are the module's task losses; its train.epochs end open stages, as in fit
        return run_of(bind_schedule(schedule, declared={"loss_weights": schedule.loss_weights}, max_epochs=total), total)
    limits: list[StageProblem] = []  # reported with the callbacks' problems, all at once
    for key in ("max_epochs", "max_steps"):
        try:
            _max_epochs_of(data, key)
        except StageConfigError as err:
            limits += err.problems
    try:
        given = check_lightning_config(data, import_modules)
    except StageConfigError as err:
        raise StageConfigError([*err.problems, *limits]) from None
    if limits:
        raise StageConfigError(limits)
    if stages is None and isinstance(_fit_section(data).get("stages"), str):  # StagesLightningCLI's option, in a file
        stages = _fit_section(data)["stages"]
    if stages is not None:
        if given:
            raise StageConfigError(two_schedules_problem(stages))
        given = [given_schedule(config=stages)]
    schedule, overrides = given[0] if given else (StageSchedule(), None)
    callbacks = _section(_fit_section(data), "trainer").get("callbacks")
    if problems := restore_best_problems(averaging_callbacks(callbacks, import_modules), schedule):  # as fit refuses
        raise StageConfigError(problems)
    declared, read = declared_by_model(_section(_fit_section(data), "model"), model_class, import_modules,
                                       needed_by=schedule.first_distilling_label())
    total = max_epochs if max_epochs is not None else _max_epochs_of(data)
    if total is None and _epochs_by_default(data):
        total = 1000  # neither limit set: Lightning's Trainer runs 1000 epochs
    if total is None:
        total = schedule.total_epochs
    steps = _max_epochs_of(data, "max_steps")
    try:
        return run_of(bind_schedule(schedule, declared=declared, weight_overrides=overrides, max_epochs=total,
                                    max_steps=steps), total, steps)
    except StageConfigError as err:
        if read or declared["loss_weights"] is not None:
            raise
        # the module's weights are unknown (a warning said so): a stage weight without a base one, or that the
        # callback's own weights do not name, may be declared there, so only the rest is checked
        rest = [p for p in err.problems if p.message not in (_NO_BASE_WEIGHT, _NOT_A_TASK_LOSS)]
        if rest:
            raise StageConfigError(rest) from None
    if isinstance(overrides, Mapping) and any(key not in overrides for stage in schedule.stages
                                              if isinstance(stage.loss_weights, Mapping) for key in stage.loss_weights):
        overrides = None  # the callback's own weights are not all of the module's (unknown here): none is the base
    return run_of(StageSchedule(schedule.stages, overrides, declared["distillation"] if schedule.distillation is None
                         else schedule.distillation, declared["lambda_coef"] if schedule.lambda_coef is None
                         else schedule.lambda_coef, total if schedule.total_epochs is None else schedule.total_epochs,
                         total_steps=steps if schedule.total_steps is None else schedule.total_steps), total, steps)


def __getattr__(name: str) -> Any:
    """``like_for_like_differences``, moved to :mod:`~lightning_stages.cli.like_for_like`, still importable from here
    (that module builds on this one)."""
    if name == "like_for_like_differences":
        from lightning_stages.cli.like_for_like import like_for_like_differences

        return like_for_like_differences
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
