"""The ``DistillationModule`` mixin: teachers that exist only when a stage needs them."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_stages.errors import StageConfigError, StageProblem, did_you_mean

__all__ = ["STUDENT", "DistillationModule"]

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


class _DistillationState:
    """What the mixin keeps per module. Lives outside ``nn.Module``'s registries on purpose."""

    def __init__(self) -> None:
        self.teachers: Optional[dict[str, nn.Module]] = None
        self.hook_spec: dict[str, tuple[str, ...]] = {}
        self.handles: list[Any] = []
        self.features: dict[str, dict[str, Any]] = {}
        self.use_distillation = False


def _closest(path: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.4)
    if not close:
        close = [n for n in names if n][:3]
    return "closest submodules: " + ", ".join(f"`{c}`" for c in close) if close else "the model has no submodules"


class DistillationModule:
    """Mixin for a ``LightningModule`` that learns from one or more teachers in some stages.

    Put it before ``LightningModule`` in the bases. Override :meth:`configure_teachers` (and optionally
    :meth:`configure_feature_hooks`); add :class:`~lightning_stages.StageScheduleCallback` to the Trainer.
    The callback calls :meth:`configure_teachers` once per fit, at setup, and only if the base flag or a stage
    needs teachers; it turns :attr:`use_distillation` on and off per stage.

    Teachers are frozen, in eval mode and follow the module to its device, but they are not submodules:
    they are not in ``state_dict()``, checkpoints, ``parameters()``, the optimizer or DDP's wrapper.
    Forward hooks capture features of named submodules, and exist only while a stage distills.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import lightning.pytorch as pl
        >>> class Student(DistillationModule, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(4, 2)
        ...         self.loss_weights = {"cls": 1.0}
        ...     def configure_teachers(self):
        ...         return {"teacher": nn.Linear(4, 2)}
        >>> model = Student()
        >>> model.prepare_teachers()
        >>> model.use_distillation = True
        >>> sorted(model.run_teachers(torch.ones(1, 4)))
        ['teacher']
        >>> "teacher" in str(list(model.state_dict()))
        False
    """

    #: distillation coefficient in force; the callback sets it per stage
    lambda_coef: float = 1.0
    #: name of the stage in force; the callback sets it per stage
    stage_name: Optional[str] = None

    # ------------------------------------------------------------------ hooks the user overrides

    def configure_teachers(self) -> Mapping[str, nn.Module]:
        """Build (or load) the teachers: a mapping from teacher name to module.

        Called at most once per fit, at setup, and only when a stage or the base flag needs teachers. Load
        weights here, not in ``__init__``, so that a schedule without distillation never reads them.
        """
        return {}

    def configure_feature_hooks(self) -> Mapping[str, Sequence[str]]:
        """Which submodules' outputs to capture: ``{"student": [...], "<teacher name>": [...]}``.

        Paths are dotted submodule names as in ``named_modules()`` (e.g. ``"encoder.layer3"``). Captured
        outputs are read with :meth:`captured_features`.
        """
        return {}

    # ------------------------------------------------------------------ state

    @property
    def _distillation_state(self) -> _DistillationState:
        state = self.__dict__.get("_ls_distillation")
        if state is None:
            state = _DistillationState()
            self.__dict__["_ls_distillation"] = state
        return state

    @property
    def use_distillation(self) -> bool:
        """Whether the distillation loss is on now. Set by the callback per stage; settable by hand."""
        return self._distillation_state.use_distillation

    @use_distillation.setter
    def use_distillation(self, value: bool) -> None:
        state = self._distillation_state
        value = bool(value)
        if value == state.use_distillation:
            return
        state.use_distillation = value
        if state.teachers is not None:
            self._sync_hooks()

    @property
    def teachers(self) -> Mapping[str, nn.Module]:
        """The prepared teachers (read-only view); empty until prepared."""
        return MappingProxyType(self._distillation_state.teachers or {})

    @property
    def teachers_prepared(self) -> bool:
        """Whether :meth:`configure_teachers` has been called for this module."""
        return self._distillation_state.teachers is not None

    # ------------------------------------------------------------------ preparation

    def prepare_teachers(self, needed_by: Optional[str] = None) -> None:
        """Build the teachers with :meth:`configure_teachers`, freeze them and check the feature hooks.

        Does nothing if they are already prepared. The callback calls this at setup; call it by hand only when
        training without the callback.

        Args:
            needed_by: the stage that needs teachers, named in error messages.

        Raises:
            StageConfigError: ``configure_teachers`` raised or returned no teachers, a teacher is not an
                ``nn.Module``, or a hook path names no submodule.
        """
        state = self._distillation_state
        if state.teachers is not None:
            return
        where = needed_by or "the base settings"
        if not isinstance(self, nn.Module):
            raise StageConfigError(StageProblem("DistillationModule must be mixed into a LightningModule"))
        if type(self)._apply is not DistillationModule._apply:
            raise StageConfigError(
                StageProblem(
                    f"{type(self).__name__} lists DistillationModule after nn.Module in its bases; "
                    f"write `class {type(self).__name__}(DistillationModule, LightningModule)` so that teachers "
                    "follow the module to its device"
                )
            )
        try:
            teachers = self.configure_teachers()
        except Exception as err:
            raise StageConfigError(
                StageProblem(
                    f"configure_teachers() raised {type(err).__name__}: {err}", name=where, field="configure_teachers",
                    value=None,
                )
            ) from err
        problems: list[StageProblem] = []
        if not isinstance(teachers, Mapping) or not teachers:
            problems.append(
                StageProblem(
                    "distillation is on but configure_teachers() returned no teachers; return a mapping "
                    "such as {'teacher': model}",
                    name=where, field="configure_teachers", value=teachers,
                )
            )
            raise StageConfigError(problems)
        for name, teacher in teachers.items():
            if not isinstance(name, str) or name == STUDENT:
                problems.append(
                    StageProblem(f"teacher names must be strings other than {STUDENT!r}", name=where,
                                 field="configure_teachers", value=name)
                )
            if not isinstance(teacher, nn.Module):
                problems.append(
                    StageProblem(f"teacher {name!r} must be an nn.Module, not {type(teacher).__name__}", name=where,
                                 field="configure_teachers", value=teacher)
                )
        if problems:
            raise StageConfigError(problems)
        teachers = dict(teachers)
        device = next((t.device for t in self.parameters()), None)  # type: ignore[attr-defined]
        for teacher in teachers.values():
            teacher.eval()
            teacher.requires_grad_(False)
            if device is not None:
                teacher.to(device)
        state.hook_spec = self._checked_hook_spec(teachers, where)
        state.teachers = teachers
        self._sync_hooks()

    def _checked_hook_spec(self, teachers: Mapping[str, nn.Module], where: str) -> dict[str, tuple[str, ...]]:
        spec = self.configure_feature_hooks() or {}
        problems: list[StageProblem] = []
        if not isinstance(spec, Mapping):
            raise StageConfigError(
                StageProblem("must return a mapping of model name to submodule paths", name=where,
                             field="configure_feature_hooks", value=spec)
            )
        checked: dict[str, tuple[str, ...]] = {}
        models = {STUDENT: self, **teachers}
        for model_name, paths in spec.items():
            field = f"configure_feature_hooks.{model_name}"
            if model_name not in models:
                problems.append(
                    StageProblem("names neither the student nor a teacher", name=where, field=field, value=model_name,
                                 hint=did_you_mean(str(model_name), list(models))
                                 or f"the models are: {', '.join(models)}")
                )
                continue
            if isinstance(paths, str):
                paths = [paths]
            names = [n for n, _ in models[model_name].named_modules()]  # type: ignore[union-attr]
            for path in paths:
                if path not in names:
                    problems.append(
                        StageProblem(f"names no submodule of {model_name!r}", name=where, field=field, value=path,
                                     hint=_closest(str(path), names))
                    )
            checked[model_name] = tuple(paths)
        if problems:
            raise StageConfigError(problems)
        return checked

    def _sync_hooks(self) -> None:
        """Attach the feature hooks while distilling, remove them (and drop features) otherwise. Idempotent."""
        state = self._distillation_state
        want = state.use_distillation and state.teachers is not None and bool(state.hook_spec)
        if want and not state.handles:
            models = {STUDENT: self, **(state.teachers or {})}
            for model_name, paths in state.hook_spec.items():
                store = state.features.setdefault(model_name, {})
                modules = dict(models[model_name].named_modules())  # type: ignore[union-attr]
                for path in paths:
                    state.handles.append(modules[path].register_forward_hook(_FeatureHook(store, path)))
        elif not want and state.handles:
            for handle in state.handles:
                handle.remove()
            state.handles.clear()
            state.features.clear()

    # ------------------------------------------------------------------ per step

    def run_teachers(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run every teacher on the given inputs without autograd, while distilling.

        Returns:
            ``{teacher name: what its forward returned}``; an empty dict (and no work) when
            :attr:`use_distillation` is off. The tensors are ordinary (``torch.no_grad``, not
            ``inference_mode``) so they can be used in the student's loss.
        """
        state = self._distillation_state
        if not state.use_distillation:
            return {}
        if state.teachers is None:
            self.prepare_teachers()
        with torch.no_grad():
            return {name: teacher(*args, **kwargs) for name, teacher in state.teachers.items()}  # type: ignore[union-attr]

    def captured_features(self, model: str = STUDENT) -> Mapping[str, Any]:
        """The outputs captured by the feature hooks of ``model`` (``"student"`` or a teacher's name).

        Returns ``{submodule path: output}`` from the latest forward of that model; empty while not distilling.
        """
        return MappingProxyType(self._distillation_state.features.get(model, {}))

    def weighted_loss(
        self,
        task_losses: Mapping[str, Tensor],
        distill_losses: Union[Mapping[str, Tensor], Sequence[Tensor], Tensor, None] = None,
    ) -> Tensor:
        """``sum(w_k * L_k) + lambda_coef * sum(distill_losses)``, the last term only while distilling.

        Args:
            task_losses: ``{loss name: value}``; every name must be a key of ``self.loss_weights``.
            distill_losses: distillation losses (mapping, sequence or one tensor); ignored when not distilling.

        Raises:
            StageConfigError: a task loss has no weight in ``self.loss_weights``.
        """
        weights: Mapping[str, float] = getattr(self, "loss_weights", None) or {}
        total: Optional[Tensor] = None
        for key, loss in task_losses.items():
            if key not in weights:
                raise StageConfigError(
                    StageProblem("has no weight in `loss_weights`", name="weighted_loss", field="task_losses",
                                 value=key, hint=did_you_mean(key, list(weights))
                                 or f"declare it in `self.loss_weights` (now: {sorted(weights)})")
                )
            term = weights[key] * loss
            total = term if total is None else total + term
        if self._distillation_state.use_distillation and distill_losses is not None:
            if isinstance(distill_losses, Tensor):
                distill_sum: Optional[Tensor] = distill_losses
            else:
                values = list(distill_losses.values()) if isinstance(distill_losses, Mapping) else list(distill_losses)
                distill_sum = None
                for value in values:
                    distill_sum = value if distill_sum is None else distill_sum + value
            if distill_sum is not None:
                term = self.lambda_coef * distill_sum  # type: ignore[attr-defined]
                total = term if total is None else total + term
        if total is None:
            raise StageConfigError(StageProblem("got no losses to weight", name="weighted_loss", field="task_losses",
                                                value=dict(task_losses)))
        return total

    # ------------------------------------------------------------------ nn.Module integration

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        for teacher in (self._distillation_state.teachers or {}).values():
            teacher._apply(fn, recurse)
        return result

    def __getstate__(self) -> dict[str, Any]:
        # deep copies (StochasticWeightAveraging) and pickles (ddp_spawn) never carry the teachers
        state = dict(super().__getstate__())  # type: ignore[misc]
        state.pop("_ls_distillation", None)
        return state
