"""Feature hooks: which submodules' outputs to capture, the forward hooks that capture them, and what they captured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Optional

from torch import nn

from lightning_stages.errors import StageConfigError, StageProblem, closest_names, did_you_mean

__all__ = ["STUDENT", "FeatureHooks", "check_hook_spec", "let_compile_see_hooks"]

#: the name of the student in ``configure_feature_hooks`` and ``captured_features``
STUDENT = "student"


class _FeatureHook:
    """A forward hook that stores a module's output under ``key``.

    A deep copy or a pickle of the hooked module (``StochasticWeightAveraging``, ``ddp_spawn``) gets a hook
    that stores nothing, so the copy never writes into the original's features.
    """

    __slots__ = ("key", "store")

    def __init__(self, store: Optional[dict[str, Any]], key: str) -> None:
        self.store = store
        self.key = key

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.store is not None:
            self.store[self.key] = output

    def __deepcopy__(self, memo: dict) -> _FeatureHook:
        return _FeatureHook(None, self.key)

    def __reduce__(self) -> tuple:
        return (_FeatureHook, (None, self.key))


def _closest_submodules(path: str, names: Sequence[str]) -> str:
    close = closest_names(path, names, n=3, cutoff=0.4) or [n for n in names if n][:3]
    return "closest submodules: " + ", ".join(f"`{c}`" for c in close) if close else "the model has no submodules"


def check_hook_spec(spec: Any, models: Mapping[str, nn.Module], where: str) -> dict[str, tuple[str, ...]]:
    """Check what ``configure_feature_hooks`` returned against the models; return it as ``{model: (paths...)}``.

    Args:
        spec: ``{model name: submodule path or paths}``.
        models: ``{"student": module, <teacher name>: module, ...}``.
        where: the stage that needs the hooks, named in errors.

    Raises:
        StageConfigError: ``spec`` is not a mapping, names an unknown model, or a path names no submodule (with the
            closest submodule names). Every problem is reported at once.

    Example::

        >>> models = {"student": nn.Sequential(nn.Linear(2, 2)), "teacher": nn.Linear(2, 2)}
        >>> check_hook_spec({"student": "0", "teacher": [""]}, models, "stage 0")
        {'student': ('0',), 'teacher': ('',)}
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
        paths = (paths,) if isinstance(paths, str) else tuple(paths)
        names = [n for n, _ in models[model_name].named_modules()]
        problems += [
            StageProblem(f"names no submodule of {model_name!r}", name=where, field=field, value=path,
                         hint=_closest_submodules(str(path), names))
            for path in paths if path not in names
        ]
        checked[model_name] = paths
    if problems:
        raise StageConfigError(problems)
    return checked


def let_compile_see_hooks() -> None:
    """Make ``torch.compile`` guard on forward hooks, so attaching and removing them per stage takes effect.

    By default Dynamo skips those guards (``skip_nnmodule_hook_guards``) and keeps running whichever hooks
    existed when it first compiled. With the guards, each hook state compiles once and is then reused.
    """
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:  # pragma: no cover - builds without Dynamo
        return
    if getattr(dynamo_config, "skip_nnmodule_hook_guards", False):
        dynamo_config.skip_nnmodule_hook_guards = False


class FeatureHooks:
    """The forward hooks of one student and its teachers, and the outputs they captured at the latest forward.

    Args:
        spec: ``{model name: (submodule paths...)}``, as returned by :func:`check_hook_spec`.

    Example::

        >>> import torch
        >>> student, teacher = nn.Sequential(nn.Linear(2, 3)), nn.Sequential(nn.Linear(2, 4))
        >>> hooks = FeatureHooks({"student": ("0",), "teacher": ("0",)})
        >>> hooks.sync(True, {"student": student, "teacher": teacher})
        >>> _ = student(torch.ones(1, 2))
        >>> hooks.captured("student")["0"].shape, dict(hooks.captured("teacher"))
        (torch.Size([1, 3]), {})
        >>> hooks.sync(False, {"student": student, "teacher": teacher})  # hooks removed, features dropped
        >>> len(student[0]._forward_hooks), dict(hooks.captured("student"))
        (0, {})
    """

    def __init__(self, spec: Optional[Mapping[str, tuple[str, ...]]] = None) -> None:
        self.spec: Mapping[str, tuple[str, ...]] = MappingProxyType(dict(spec or {}))
        self._handles: list[Any] = []
        self._features: dict[str, dict[str, Any]] = {}

    def sync(self, on: bool, models: Mapping[str, nn.Module]) -> None:
        """Attach the hooks to ``models`` if ``on`` (and there are any), else remove them and drop the features.

        Idempotent: a second call with the same ``on`` changes nothing.
        """
        if on and self.spec and not self._handles:
            for model_name, paths in self.spec.items():
                store = self._features.setdefault(model_name, {})
                modules = dict(models[model_name].named_modules())
                self._handles += [modules[path].register_forward_hook(_FeatureHook(store, path)) for path in paths]
        elif not on and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._features.clear()

    def captured(self, model: str = STUDENT) -> Mapping[str, Any]:
        """``{submodule path: output}`` of ``model`` from its latest forward (read-only); empty while detached."""
        return MappingProxyType(self._features.get(model, {}))

    def put(self, features: Mapping[str, Mapping[str, Any]]) -> None:
        """Put features that did not come from a forward (a teacher cache's) where :meth:`captured` reads them."""
        for model_name, captured in features.items():
            store = self._features.get(model_name)
            if store is not None:
                store.update(captured)

    def snapshot(self, models: Sequence[str]) -> dict[str, dict[str, Any]]:
        """A copy of what the hooks of ``models`` captured, for the models that have hooks."""
        return {name: dict(self._features.get(name, {})) for name in models if self.spec.get(name)}
