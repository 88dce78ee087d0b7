"""Hook specs: ``configure_feature_hooks()`` checked against the models (paths, selectors, the student's per-teacher
pairing), before any hook is attached."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_stages.distillation.feature_selectors import split_hook_path
from lightning_stages.errors import StageConfigError, StageProblem, closest_names, did_you_mean

__all__ = ["STUDENT", "check_hook_spec", "student_pairing"]

#: the name of the student in ``configure_feature_hooks`` and ``captured_features``
STUDENT = "student"


def _closest_submodules(path: str, names: Sequence[str]) -> str:
    close = closest_names(path, names, n=3, cutoff=0.4) or [n for n in names if n][:3]
    return "closest submodules: " + ", ".join(f"`{c}`" for c in close) if close else "the model has no submodules"


def _hook_problems(model_name: str, paths: Any, model: nn.Module, where: str, field: str) -> list[StageProblem]:
    modules = dict(model.named_modules())
    problems = []
    for path in paths:
        try:
            module = split_hook_path(path)[0] if isinstance(path, str) else None
        except ValueError as err:
            problems.append(StageProblem(str(err), name=where, field=field, value=path))
            continue
        if module not in modules:
            problems.append(StageProblem(f"names no submodule of {model_name!r}", name=where, field=field, value=path,
                                         hint=_closest_submodules(str(module if module is not None else path),
                                                                  list(modules))))
        elif isinstance(modules[module], torch.jit.ScriptModule):  # register_forward_hook would raise
            scripted = repr(model_name) + ("" if isinstance(model, torch.jit.ScriptModule) else f", {module!r}")
            problems.append(StageProblem(f"hooks a TorchScript module ({scripted}), which takes no forward hooks",
                                         name=where, field=field, value=path,
                                         hint="hook the module before scripting it, or distill its outputs only"))
    return problems


def check_hook_spec(spec: Any, models: Mapping[str, nn.Module], where: str) -> dict[str, tuple[str, ...]]:
    """Check what ``configure_feature_hooks`` returned against the models; return it as ``{model: (paths...)}``.

    A path may end in selectors (:mod:`.feature_selectors`): ``"encoder.layer.3[0]"``, ``"encoder:last_hidden_state"``.
    The student's entry may also be ``{teacher name: paths}``, pairing student layers with each teacher's layers
    separately (see :func:`student_pairing`); the result then lists each student path once.

    Args:
        spec: ``{model name: submodule path or paths}``.
        models: ``{"student": module, <teacher name>: module, ...}``.
        where: the stage that needs the hooks, named in errors.

    Raises:
        StageConfigError: ``spec`` is not a mapping, names an unknown model, an entry is neither a path nor a list of
            paths, a path names no submodule (with the closest submodule names) or a TorchScript one (which takes no
            forward hooks), or has a malformed selector. Every problem is
            reported at once.

    Example::

        >>> models = {"student": nn.Sequential(nn.Linear(2, 2)), "teacher": nn.Linear(2, 2)}
        >>> check_hook_spec({"student": "0", "teacher": [":weight"]}, models, "stage 0")
        {'student': ('0',), 'teacher': (':weight',)}
        >>> check_hook_spec({"student": {"teacher": ["0[0]"]}}, models, "stage 0")
        {'student': ('0[0]',)}
        >>> check_hook_spec({"student": ["1"]}, models, "stage 0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem ...: names no submodule of 'student'; closest ...: `0`
    """
    if not isinstance(spec, Mapping):
        raise StageConfigError(StageProblem("must return a mapping of model name to submodule paths", name=where,
                                            field="configure_feature_hooks", value=spec))
    problems: list[StageProblem] = []
    checked: dict[str, tuple[str, ...]] = {}
    for model_name, paths in spec.items():
        field = f"configure_feature_hooks.{model_name}"
        if model_name not in models:
            problems.append(StageProblem("names neither the student nor a teacher", name=where, field=field,
                                         value=model_name, hint=did_you_mean(str(model_name), list(models))
                                         or f"the models are: {', '.join(models)}"))
            continue
        if model_name == STUDENT and isinstance(paths, Mapping):
            unknown = [t for t in paths if t not in models or t == STUDENT]
            problems += [StageProblem("is not a teacher (the student's entry may pair layers per teacher)", name=where,
                                      field=field, value=t, hint=did_you_mean(str(t), [m for m in models if m != STUDENT]))
                         for t in unknown]
            bad = [t for t, p in paths.items() if not _is_paths(p)]
            problems += [StageProblem(_NOT_PATHS, name=where, field=f"{field}.{t}", value=paths[t]) for t in bad]
            per_teacher = [_as_paths(p) for t, p in paths.items() if t not in bad]
            paths = tuple(dict.fromkeys(path for group in per_teacher for path in group))
        if not _is_paths(paths):
            problems.append(StageProblem(_NOT_PATHS, name=where, field=field, value=paths))
            continue
        paths = _as_paths(paths)
        problems += _hook_problems(model_name, paths, models[model_name], where, field)
        checked[model_name] = paths
    if problems:
        raise StageConfigError(problems)
    return checked


_NOT_PATHS = "must be a submodule path or a list of them (in pairing order)"


def _is_paths(paths: Any) -> bool:
    return isinstance(paths, (str, Sequence))  # a set has no order to pair in


def _as_paths(paths: Any) -> tuple[str, ...]:
    return (paths,) if isinstance(paths, str) else tuple(paths)


def student_pairing(spec: Mapping[str, Any], teachers: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``{teacher: the student paths paired with its layers}`` of a checked ``configure_feature_hooks`` spec: the
    student's own list for every teacher, or its ``{teacher: paths}`` entry.

    Example::

        >>> student_pairing({"student": {"a": "x", "b": ["y", "z"]}}, ["a", "b", "c"])
        {'a': ('x',), 'b': ('y', 'z'), 'c': ()}
        >>> student_pairing({"student": ["x"]}, ["a"])
        {'a': ('x',)}
    """
    own = spec.get(STUDENT, ())
    if isinstance(own, Mapping):
        return {t: _as_paths(own.get(t, ())) for t in teachers}
    return {t: _as_paths(own) for t in teachers}
