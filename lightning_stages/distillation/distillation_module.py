"""The ``DistillationModule`` mixin: teachers that exist only when a stage needs them."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_stages.distillation.teacher_cache import TeacherCache, teacher_fingerprint
from lightning_stages.distillation.unused_parameters import keep_in_graph, unreached_parameters
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
        self.offloaded = False  # teachers kept on CPU by `offload_teachers`
        self.cache_fingerprint: Optional[str] = None  # None: check the teacher cache's fingerprint at next use


def _named_distill_losses(losses: Union[Mapping[str, Tensor], Sequence[Tensor], Tensor]) -> list[tuple[str, Tensor]]:
    if isinstance(losses, Tensor):
        return [("distill_losses", losses)]
    if isinstance(losses, Mapping):
        return [(str(k), v) for k, v in losses.items()]
    return [(f"distill_losses[{i}]", v) for i, v in enumerate(losses)]


def _check_finite(named: Sequence[tuple[str, Tensor]], stage: Optional[str], epoch: Optional[int]) -> None:
    """Raise if a distillation loss is NaN or infinite. One host sync per loss: call once per stage, not per step."""
    problems = []
    for name, value in named:
        value = torch.as_tensor(value).detach()
        if not bool(torch.isfinite(value).all()):
            shown = value.item() if value.numel() == 1 else "a tensor with non-finite entries"
            problems.append(
                StageProblem(
                    f"is not finite at epoch {epoch}, the first training step of the stage; check the teacher's "
                    "outputs, the temperature and the inputs of this loss",
                    name=f"stage {stage!r}" if stage is not None else "the current stage",
                    field=f"distill_losses.{name}", value=shown,
                )
            )
    if problems:
        raise StageConfigError(problems)


def _ddp_needs_every_parameter(trainer: Any) -> bool:
    """Whether the module trains under DDP without ``find_unused_parameters``: every parameter needs a gradient."""
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return isinstance(model, DistributedDataParallel) and not model.find_unused_parameters


#: ``teacher_precision`` values and the autocast dtype each runs the teachers under (``None``: no autocast)
_AUTOCAST_DTYPES: dict[Optional[str], Optional[torch.dtype]] = {
    None: None, "32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16,
}
_OFFLOAD_MODES = (False, True, "after_last", "idle")


def _let_compile_see_hooks() -> None:
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


def _keep_on_own_device(fn: Callable[[Tensor], Tensor], tensor: Tensor) -> Tensor:
    """``fn(tensor)``, except that a change of device is dropped (a change of dtype is kept).

    Used for offloaded teachers: ``module.to("cuda")`` must not bring them to the accelerator, while
    ``module.half()`` still casts them. ``fn`` is first tried on an empty tensor to see what it does.
    """
    probe = fn(tensor.new_empty(0))
    if probe.device == tensor.device:
        return fn(tensor)
    return tensor.to(dtype=probe.dtype) if probe.dtype != tensor.dtype else tensor


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

    Cost options (class attributes, or set them in ``__init__``); without any of them :meth:`run_teachers` is a
    plain ``torch.no_grad()`` loop over the teachers:

    * ``teacher_precision``: ``"bf16-mixed"`` or ``"16-mixed"`` runs the teachers under ``torch.autocast`` on
      their device type; ``None`` (default) runs them as they are.
    * ``offload_teachers``: ``True`` (or ``"after_last"``) keeps the teachers on CPU once no current or later
      stage distills; ``"idle"`` keeps them on CPU whenever the current stage does not distill. The callback
      moves them back to the module's device at the start of the next distilling stage; moving the module
      (``.to(device)``) leaves offloaded teachers on CPU. ``False`` (default) keeps them with the module.
    * ``teacher_cache``: a :class:`~lightning_stages.TeacherCache`; training steps then read the teachers'
      outputs and hooked features from it by sample index (``run_teachers(x, sample_index=...)``) and run the
      teachers only for samples not yet stored.

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
    #: autocast precision of the teachers' forward: None, "bf16-mixed" or "16-mixed"
    teacher_precision: Optional[str] = None
    #: move teachers to CPU while unused: False, True / "after_last" (no current or later stage distills), "idle"
    offload_teachers: Union[bool, str] = False
    #: opt-in store of teacher outputs per sample (offline distillation); needs ``run_teachers(sample_index=...)``
    teacher_cache: Optional[TeacherCache] = None

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
        if value:
            state.cache_fingerprint = None  # the teacher cache checks the teachers again at its next use
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
                ``nn.Module``, a hook path names no submodule, or ``teacher_precision``, ``offload_teachers`` or
                ``teacher_cache`` has an unknown value.
        """
        state = self._distillation_state
        where = needed_by or "the base settings"
        self._check_cost_options(where)
        state.cache_fingerprint = None  # each fit checks the teacher cache against the teachers again
        if state.teachers is not None:
            return
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
        if state.hook_spec:
            _let_compile_see_hooks()
        self._sync_hooks()

    def _check_cost_options(self, where: str) -> None:
        problems = []
        if not isinstance(self.teacher_precision, (str, type(None))) or self.teacher_precision not in _AUTOCAST_DTYPES:
            problems.append(
                StageProblem("is not a teacher precision", name=where, field="teacher_precision",
                             value=self.teacher_precision,
                             hint=did_you_mean(str(self.teacher_precision), [k for k in _AUTOCAST_DTYPES if k])
                             or "use None, 'bf16-mixed' or '16-mixed'")
            )
        if not isinstance(self.offload_teachers, (bool, str)) or self.offload_teachers not in _OFFLOAD_MODES:
            problems.append(
                StageProblem("is not an offload mode", name=where, field="offload_teachers",
                             value=self.offload_teachers, hint="use False, True, 'after_last' or 'idle'")
            )
        if self.teacher_cache is not None and not isinstance(self.teacher_cache, TeacherCache):
            problems.append(
                StageProblem(f"must be a TeacherCache or None, not {type(self.teacher_cache).__name__}", name=where,
                             field="teacher_cache", value=self.teacher_cache)
            )
        if problems:
            raise StageConfigError(problems)

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

    def run_teachers(self, *args: Any, sample_index: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Run every teacher on the given inputs without autograd, while distilling.

        Without cost options this is a ``torch.no_grad()`` loop over the teachers. With ``teacher_precision``
        the loop runs under ``torch.autocast``; offloaded teachers are first moved to the module's device. With a
        ``teacher_cache``, a training step whose samples are all stored returns the stored outputs (and puts the
        stored teacher features where :meth:`captured_features` reads them) without running the teachers; any
        other training step runs them and stores the results. Evaluation steps (module in eval mode) run them.

        Args:
            *args: the teachers' positional inputs.
            sample_index: the dataset indices of the batch's samples (a tensor, list or array, one per row), e.g.
                from :class:`~lightning_stages.IndexedDataset`. Needed with ``teacher_cache``; ignored otherwise.
            **kwargs: the teachers' keyword inputs.

        Returns:
            ``{teacher name: what its forward returned}``; an empty dict (and no work) when
            :attr:`use_distillation` is off. The tensors are ordinary (``torch.no_grad``, not
            ``inference_mode``) so they can be used in the student's loss.

        Raises:
            StageConfigError: ``teacher_cache`` is set but ``sample_index`` is not given.
        """
        state = self._distillation_state
        if not state.use_distillation:
            return {}
        if state.teachers is None:
            self.prepare_teachers()
        if self.teacher_cache is None and self.teacher_precision is None and not state.offloaded:
            with torch.no_grad():
                return {name: teacher(*args, **kwargs) for name, teacher in state.teachers.items()}  # type: ignore[union-attr]
        return self._run_teachers_with_options(args, kwargs, sample_index)

    def _run_teachers_with_options(self, args: tuple, kwargs: dict[str, Any], sample_index: Any) -> dict[str, Any]:
        state = self._distillation_state
        teachers: dict[str, nn.Module] = state.teachers  # type: ignore[assignment]
        cache = self.teacher_cache if self.training else None  # type: ignore[attr-defined]
        if cache is not None:
            if sample_index is None:
                raise StageConfigError(
                    StageProblem(
                        "is set but the batch carries no sample index, so stored teacher outputs cannot be matched "
                        "to samples", name=f"stage {self.stage_name!r}" if self.stage_name else "the current stage",
                        field="teacher_cache", value=cache,
                        hint="pass the batch's dataset indices as run_teachers(..., sample_index=indices), e.g. "
                        "from a dataset wrapped in IndexedDataset, or set teacher_cache = None",
                    )
                )
            if state.cache_fingerprint is None:
                extra = {"precision": self.teacher_precision}
                layers = {name: state.hook_spec.get(name, ()) for name in teachers}
                state.cache_fingerprint = teacher_fingerprint(teachers, layers, extra)
                cache.bind(state.cache_fingerprint)
            hit = cache.lookup(sample_index, device=self._module_device())
            if hit is not None:
                outputs, features = hit
                for name, captured in features.items():
                    store = state.features.get(name)
                    if store is not None:
                        store.update(captured)
                return outputs
        if state.offloaded:
            self._restore_teachers()
        dtype = _AUTOCAST_DTYPES.get(self.teacher_precision)
        with torch.no_grad():
            if dtype is None:
                outputs = {name: teacher(*args, **kwargs) for name, teacher in teachers.items()}
            else:
                device_type = self._module_device().type
                with torch.autocast(device_type, dtype=dtype):
                    outputs = {name: teacher(*args, **kwargs) for name, teacher in teachers.items()}
        if cache is not None:
            features = {name: dict(state.features.get(name, {})) for name in teachers if state.hook_spec.get(name)}
            cache.store(sample_index, outputs, features)
        return outputs

    def _module_device(self) -> torch.device:
        param = next(self.parameters(), None)  # type: ignore[attr-defined]
        if param is not None:
            return param.device
        teacher_param = next((p for t in (self._distillation_state.teachers or {}).values() for p in t.parameters()),
                             None)
        return teacher_param.device if teacher_param is not None else torch.device("cpu")

    # ------------------------------------------------------------------ teacher placement

    @property
    def teachers_offloaded(self) -> bool:
        """Whether ``offload_teachers`` keeps the teachers on CPU now (they come back before a distilling stage)."""
        return self._distillation_state.offloaded

    def update_teacher_placement(self, distills_now: bool, distills_later: bool = False) -> None:
        """Offload the teachers to CPU or bring them back to the module's device, as ``offload_teachers`` says.

        The callback calls this at every stage application; call it by hand only without the callback. With
        ``offload_teachers=False`` (default) it does nothing unless teachers are still offloaded.

        Args:
            distills_now: whether the current stage distills.
            distills_later: whether a later stage distills.

        Raises:
            StageConfigError: ``offload_teachers`` is not one of ``False``, ``True``, ``"after_last"``, ``"idle"``.

        Example::

            >>> import lightning.pytorch as pl
            >>> class Student(DistillationModule, pl.LightningModule):
            ...     offload_teachers = "idle"
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.net = nn.Linear(2, 2)
            ...     def configure_teachers(self):
            ...         return {"teacher": nn.Linear(2, 2)}
            >>> model = Student(); model.prepare_teachers()
            >>> model.update_teacher_placement(distills_now=False, distills_later=True)
            >>> model.teachers_offloaded
            True
            >>> _ = model.to("meta")  # stands in for an accelerator: offloaded teachers stay on CPU
            >>> model.teachers["teacher"].weight.device.type
            'cpu'
            >>> model.update_teacher_placement(distills_now=True)
            >>> model.teachers_offloaded, model.teachers["teacher"].weight.device.type
            (False, 'meta')
        """
        state = self._distillation_state
        mode = self.offload_teachers
        if not mode and not state.offloaded:
            return
        if state.teachers is None:
            return
        if not isinstance(mode, (bool, str)) or mode not in _OFFLOAD_MODES:
            self._check_cost_options(f"stage {self.stage_name!r}" if self.stage_name else "the current stage")
        if not mode:
            offload = False
        elif mode == "idle":
            offload = not distills_now
        else:
            offload = not (distills_now or distills_later)
        if offload and not state.offloaded:
            for teacher in state.teachers.values():
                teacher.to("cpu")
            state.offloaded = True
        elif not offload and state.offloaded:
            self._restore_teachers()

    def _restore_teachers(self) -> None:
        state = self._distillation_state
        device = self._module_device()
        for teacher in (state.teachers or {}).values():
            teacher.to(device)
        state.offloaded = False

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

        On the first training step of each stage it also checks that every distillation loss is finite (one host
        sync per stage, none per step) and, under DDP, finds the trainable parameters the stage's loss leaves
        unused; on every step of that stage they get a zero-weighted term, so DDP needs no
        ``find_unused_parameters=True``. On one device nothing is added.

        Args:
            task_losses: ``{loss name: value}``; every name must be a key of ``self.loss_weights``.
            distill_losses: distillation losses (mapping, sequence or one tensor); ignored when not distilling.

        Raises:
            StageConfigError: a task loss has no weight in ``self.loss_weights``; or, on the first training step
                of a stage, a distillation loss is NaN or infinite (the message names the loss, the epoch and the
                stage).

        Example::

            >>> import lightning.pytorch as pl
            >>> class Student(DistillationModule, pl.LightningModule):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.loss_weights = {"bce": 1.0, "dice": 0.5}
            >>> model = Student()
            >>> model.use_distillation, model.lambda_coef = True, 0.5
            >>> task = {"bce": torch.tensor(2.0), "dice": torch.tensor(2.0)}
            >>> float(model.weighted_loss(task, {"kd": torch.tensor(4.0)}))  # 1*2 + 0.5*2 + 0.5*4
            5.0
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
        named: list[tuple[str, Tensor]] = []
        if self._distillation_state.use_distillation and distill_losses is not None:
            named = _named_distill_losses(distill_losses)
            distill_sum: Optional[Tensor] = None
            for _, value in named:
                distill_sum = value if distill_sum is None else distill_sum + value
            if distill_sum is not None:
                term = self.lambda_coef * distill_sum  # type: ignore[attr-defined]
                total = term if total is None else total + term
        if total is None:
            raise StageConfigError(StageProblem("got no losses to weight", name="weighted_loss", field="task_losses",
                                                value=dict(task_losses)))
        if total.requires_grad:  # a training step (not validation, not under no_grad)
            total = self._guard_stage(total, named)
        return total

    def _guard_stage(self, total: Tensor, named: list[tuple[str, Tensor]]) -> Tensor:
        """Checks on the first training step of each stage, and the zero term that keeps DDP whole.

        On the first step of a stage (the stage name, the distillation switch or the Trainer changed): the
        distillation losses must be finite (one host sync per stage, none per step), and under
        ``DistributedDataParallel`` the autograd graph of ``total`` is walked once to find the trainable parameters
        the stage leaves unused. On every step of the stage those get a zero-weighted term, so each rank's backward
        reaches every parameter and DDP needs no ``find_unused_parameters=True``. On one device nothing is added.
        """
        trainer = getattr(self, "_trainer", None)
        key = (self.stage_name, self._distillation_state.use_distillation, id(trainer))
        guard = self.__dict__.get("_ls_stage_guard")
        if guard is None or guard[0] != key:
            self.__dict__["_ls_stage_guard"] = guard = (key, ())
            _check_finite(named, self.stage_name, getattr(trainer, "current_epoch", None))
            if _ddp_needs_every_parameter(trainer):
                guard = (key, tuple(unreached_parameters(total, self.parameters())))  # type: ignore[attr-defined]
                self.__dict__["_ls_stage_guard"] = guard
        return keep_in_graph(total, guard[1]) if guard[1] else total

    def feature_losses(
        self,
        adapters: Optional[Mapping[str, Callable[[Tensor], Tensor]]] = None,
        teacher: Optional[str] = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
    ) -> dict[str, Tensor]:
        """Feature-distillation losses of every hooked layer pair, keyed ``"<student path> -> <teacher>.<path>"``.

        The student's hooked paths and the teacher's (from :meth:`configure_feature_hooks`) are paired in the
        order they are listed. Call it after the student's forward and :meth:`run_teachers` on the batch.

        Args:
            adapters: ``{student path: module}`` mapping that layer's features to the teacher's shape
                (e.g. :class:`~lightning_stages.losses.FeatureAdapter`).
            teacher: the teacher to pair with; defaults to the first one.
            loss_fn: ``loss_fn(student_features, teacher_features)``; mean squared error by default.

        Returns:
            The losses, ready for :meth:`weighted_loss`; an empty dict when not distilling.

        Raises:
            StageConfigError: the hooked layers do not pair up, a layer was not captured, or the shapes of a pair
                differ after its adapter. The message names the pair, both shapes and the stage; it is raised at
                the first distilling step.

        Example::

            >>> import lightning.pytorch as pl
            >>> class Student(DistillationModule, pl.LightningModule):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.body, self.adapter = nn.Linear(4, 3), nn.Linear(3, 5)
            ...     def configure_teachers(self):
            ...         return {"teacher": nn.Sequential(nn.Linear(4, 5))}
            ...     def configure_feature_hooks(self):
            ...         return {"student": ["body"], "teacher": ["0"]}
            >>> model = Student(); model.prepare_teachers(); model.use_distillation = True
            >>> _ = model.body(torch.ones(2, 4)); _ = model.run_teachers(torch.ones(2, 4))
            >>> sorted(model.feature_losses(adapters={"body": model.adapter}))
            ['body -> teacher.0']
        """
        state = self._distillation_state
        if not state.use_distillation:
            return {}
        names = list(state.teachers or {})
        teacher = teacher if teacher is not None else (names[0] if names else None)
        stage = f"stage {self.stage_name!r}" if self.stage_name is not None else "the current stage"
        student_paths = state.hook_spec.get(STUDENT, ())
        teacher_paths = state.hook_spec.get(teacher, ()) if teacher is not None else ()
        if len(student_paths) != len(teacher_paths):
            raise StageConfigError(
                StageProblem(
                    f"lists {len(student_paths)} student layer(s) and {len(teacher_paths)} layer(s) of teacher "
                    f"{teacher!r}; feature_losses() pairs them in order, so give as many of each",
                    name=stage, field="configure_feature_hooks", value={STUDENT: student_paths, teacher: teacher_paths},
                )
            )
        captured_s = state.features.get(STUDENT, {})
        captured_t = state.features.get(teacher, {})  # type: ignore[arg-type]
        losses: dict[str, Tensor] = {}
        for s_path, t_path in zip(student_paths, teacher_paths):
            pair = f"{s_path} -> {teacher}.{t_path}"
            if s_path not in captured_s or t_path not in captured_t:
                raise StageConfigError(
                    StageProblem("was not captured; run the student and run_teachers() on the batch first",
                                 name=stage, field="feature pair", value=pair)
                )
            adapter = (adapters or {}).get(s_path)
            student = captured_s[s_path] if adapter is None else adapter(captured_s[s_path])
            target = captured_t[t_path]
            if student.shape != target.shape:
                raise StageConfigError(
                    StageProblem(
                        f"student features {tuple(student.shape)}"
                        f"{' (after its adapter)' if adapter is not None else ''} do not match teacher features "
                        f"{tuple(target.shape)}",
                        name=stage, field="feature pair", value=pair,
                        hint=None if adapter is not None else
                        f"pass adapters={{{s_path!r}: FeatureAdapter(student_channels, teacher_channels)}}",
                    )
                )
            losses[pair] = loss_fn(student, target)
        return losses

    # ------------------------------------------------------------------ nn.Module integration

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        state = self._distillation_state
        for teacher in (state.teachers or {}).values():
            if state.offloaded:  # offloaded teachers follow dtype changes, not device moves
                teacher._apply(lambda t: _keep_on_own_device(fn, t), recurse)
            else:
                teacher._apply(fn, recurse)
        return result

    def __getstate__(self) -> dict[str, Any]:
        # deep copies (StochasticWeightAveraging) and pickles (ddp_spawn) never carry the teachers
        state = dict(super().__getstate__())  # type: ignore[misc]
        state.pop("_ls_distillation", None)
        return state
