"""What each teacher is fed: the same inputs for all, or each teacher its own (``run_teachers(inputs=...)``), and a
teacher's forward whose input mistakes name the teacher."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Optional

import torch
from torch import nn

from lightning_stages.distillation.step_checks import stage_where
from lightning_stages.distillation.teacher_cache_inputs import input_versions
from lightning_stages.distillation.teacher_options import autocast_in_force
from lightning_stages.errors import DistillationStepError, StageProblem, did_you_mean

__all__ = ["containers_copied", "deferred_run", "forward_named", "teacher_calls"]


def teacher_calls(names: list[str], args: tuple, kwargs: Mapping[str, Any], inputs: Optional[Mapping[str, Any]],
                  stage: Optional[str]) -> dict[str, tuple[tuple, dict]]:
    """``{teacher: (args, kwargs)}``: the same ``args``/``kwargs`` for every teacher, or each teacher's own entry of
    ``inputs``: a tuple or list is its positional arguments, a mapping its keyword arguments, anything else its one
    argument.

    Raises:
        DistillationStepError: ``inputs`` is given with ``args``/``kwargs``, is not a mapping, misses a teacher or
            names one that does not exist (with a did-you-mean).

    Example::

        >>> calls = teacher_calls(["a", "b"], (), {}, {"a": (1,), "b": {"x": 2}}, "kd")
        >>> calls["a"], calls["b"]
        (((1,), {}), ((), {'x': 2}))
    """
    if inputs is None:
        return {name: (tuple(args), dict(kwargs)) for name in names}
    where = stage_where(stage)
    if args or kwargs or not isinstance(inputs, Mapping):
        raise DistillationStepError(StageProblem(
            "must be a mapping {teacher name: inputs}, given without other positional or keyword arguments",
            name=where, field="run_teachers.inputs", value=type(inputs).__name__), stage=stage, when="a step")
    problems = [StageProblem("is not a teacher", name=where, field="run_teachers.inputs", value=key,
                             hint=did_you_mean(str(key), names) or f"the teachers are: {', '.join(names)}")
                for key in inputs if key not in names]
    problems += [StageProblem("has no inputs; give every teacher its own", name=where, field="run_teachers.inputs",
                              value=name) for name in names if name not in inputs]
    if problems:
        raise DistillationStepError(problems, stage=stage, when="a step")
    calls: dict[str, tuple[tuple, dict]] = {}
    for name in names:
        given = inputs[name]
        if isinstance(given, Mapping):
            calls[name] = ((), dict(given))
        elif isinstance(given, (tuple, list)):
            calls[name] = (tuple(given), {})
        else:
            calls[name] = ((given,), {})
    return calls


#: the teacher whose forward :func:`forward_named` is running (``None`` outside): a hooked module that several
#: models share stores its output only for the model running it (``FeatureHooks``)
RUNNING_TEACHER: ContextVar[Optional[str]] = ContextVar("lightning_stages_running_teacher", default=None)


def forward_named(name: str, teacher: nn.Module, call: tuple[tuple, dict], stage: Optional[str], shared: bool) -> Any:
    """``teacher(*args, **kwargs)`` (as :data:`RUNNING_TEACHER`); an input mistake raised inside it names the
    teacher."""
    args, kwargs = call
    token = RUNNING_TEACHER.set(name)
    try:
        return teacher(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, RuntimeError) as err:
        hint = "give each teacher its own inputs: run_teachers(inputs={name: (args...) or {kwargs}})" if shared else None
        raise DistillationStepError(StageProblem(
            f"teacher {name!r} raised {type(err).__name__} in its forward: {err}", name=stage_where(stage),
            field=f"teachers.{name}", value=type(teacher).__name__, hint=hint), stage=stage, when="a step") from err
    finally:
        RUNNING_TEACHER.reset(token)


def containers_copied(value: Any, depth: int = 0) -> Any:
    """``value`` with its tuples, lists and dicts copied (their tensors and other items are the same objects), so that
    a caller who puts another tensor into a dict or list it passed to ``run_teachers`` does not change what the
    teachers are later run on. Other containers (a ``BatchEncoding``) are copied shallowly, keeping their type.

    Example::

        >>> given = {"x": [1, 2]}
        >>> copied = containers_copied(given)
        >>> given["x"].append(3); copied
        {'x': [1, 2]}
    """
    if depth > 100 or isinstance(value, torch.Tensor):
        return value
    if type(value) is tuple:
        return tuple(containers_copied(item, depth + 1) for item in value)
    if type(value) is list:
        return [containers_copied(item, depth + 1) for item in value]
    if type(value) is dict:
        return {key: containers_copied(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, Mapping)):
        try:
            return copy.copy(value)
        except Exception:  # a container that cannot be copied: as it is
            return value
    return value


def deferred_run(run: Callable[[list[str]], Any], given: Any, device_type: str, stage: Optional[str]
              ) -> Callable[[list[str]], Any]:
    """``run`` (the hooked teachers on a batch the cache served without features, when a feature is first read) as
    ``run_teachers`` would have run them: under the autocast in force then, and refused if the inputs were changed
    in place since (the features would be another input's). ``given`` holds the inputs' containers as they were
    (:func:`containers_copied`): a container the caller changes afterwards is not read."""
    versions, autocast = input_versions(given), autocast_in_force(device_type)

    def deferred(names: list[str]) -> Any:
        if versions is not None and input_versions(given) != versions:
            raise DistillationStepError(StageProblem(
                "were changed in place after run_teachers, before a teacher feature was read; with "
                "TeacherCache(store_features=False) a served batch's features are computed when first read, from "
                "the inputs as they are then", name=stage_where(stage), field="teacher inputs", value="changed",
                hint="read the features (feature_losses, captured_features) before changing the inputs, change a "
                "copy, or use store_features=True"), stage=stage, when="a training step")
        same = autocast_in_force(device_type) == autocast
        with contextlib.nullcontext() if same else torch.autocast(device_type, dtype=autocast, enabled=bool(autocast)):
            return run(names)
    return deferred
