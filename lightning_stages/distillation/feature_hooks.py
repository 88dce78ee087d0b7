"""Feature hooks: which submodules' outputs to capture, the forward hooks that capture them, and what they captured."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_stages.distillation.feature_selectors import select, split_hook_path, tensor_selectors
from lightning_stages.distillation.hook_specs import STUDENT, check_hook_spec, student_pairing
from lightning_stages.distillation.teacher_inputs import RUNNING_TEACHER
from lightning_stages.errors import DistillationStepError, StageProblem, did_you_mean
from lightning_stages.losses import paired_feature_losses

__all__ = ["STUDENT", "FeatureHooks", "check_hook_spec", "student_pairing"]  # all but FeatureHooks: from hook_specs


class _Capture:
    """What a hook captured: the selected output and the tensor version it had then (``None``: not a tensor, or an
    inference tensor, which keeps no version), or why the selectors did not apply."""

    __slots__ = ("failed", "raw", "value", "version", "without_grad")

    def __init__(self, value: Any, raw: Any = None, failed: Optional[str] = None, without_grad: bool = False) -> None:
        self.value, self.raw, self.failed, self.without_grad = value, raw, failed, without_grad
        self.version = value._version if isinstance(value, Tensor) and not value.is_inference() else None


class _FeatureHook:
    """A forward hook of ``model`` that stores a module's (selected) output under ``key``, copied if ``copy``; while
    another model's teacher forward runs (:data:`RUNNING_TEACHER`: a module the models share) it stores nothing, nor
    (``own_run_only``: a teacher's module that the student has too) while no teacher runs: the student's forward.

    A deep copy or a pickle of the hooked module (``StochasticWeightAveraging``, ``ddp_spawn``) gets a hook
    that stores nothing, so the copy never writes into the original's features.
    """

    __slots__ = ("copy", "key", "model", "own_run_only", "steps", "store")

    def __init__(self, store: Optional[dict[str, Any]], key: str, copy: bool = False, model: str = STUDENT,
                 own_run_only: bool = False) -> None:
        self.store, self.key, self.model, self.copy, self.own_run_only = store, key, model, copy, own_run_only
        self.steps = split_hook_path(key)[1]

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        running = RUNNING_TEACHER.get()  # a module shared by models: only the one running it stores
        if self.store is None or (running != self.model if running is not None else self.own_run_only):
            return
        try:
            value = select(output, self.steps)
        except LookupError as err:
            self.store[self.key] = _Capture(None, raw=output, failed=str(err))
            return
        if self.copy and isinstance(value, Tensor):
            value = value.clone()
        # a training student module with trainable weights whose output has no gradient: it ran under no_grad, e.g. in
        # torch.utils.checkpoint(..., use_reentrant=True), so a loss on this capture cannot train it
        without_grad = (self.model == STUDENT and isinstance(value, Tensor) and not value.requires_grad
                        and not torch.is_grad_enabled() and module.training
                        and any(p.requires_grad for p in module.parameters()))
        # a selection that is no tensor keeps the module's output, whose tensors the error then offers
        raw = output if self.steps and not isinstance(value, Tensor) else None
        self.store[self.key] = _Capture(value, raw=raw, without_grad=without_grad)

    def __deepcopy__(self, memo: dict) -> _FeatureHook:
        return _FeatureHook(None, self.key, self.copy, self.model, self.own_run_only)

    def __reduce__(self) -> tuple:
        return (_FeatureHook, (None, self.key, self.copy, self.model, self.own_run_only))


class FeatureHooks:
    """The forward hooks of one student and its teachers, and the outputs they captured at the latest forward.

    Reading checks what was captured: each value must be a tensor (or be made one by the path's selectors) and must
    not have been modified in place since its capture (its ``_version``), which a ResNet block's ``out += identity``
    followed by ``ReLU(inplace=True)`` does to a hooked ``bn2``. With ``copy`` the hooks store a copy instead.

    Args:
        spec: ``{model name: (submodule paths...)}``, as returned by :func:`check_hook_spec`.
        pairing: ``{teacher: student paths}`` when the student's entry pairs layers per teacher
            (:func:`student_pairing`); default: the student's paths for each.

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

    def __init__(self, spec: Optional[Mapping[str, tuple[str, ...]]] = None,
                 pairing: Optional[Mapping[str, tuple[str, ...]]] = None) -> None:
        self.spec: Mapping[str, tuple[str, ...]] = MappingProxyType(dict(spec or {}))
        self.pairing: Mapping[str, tuple[str, ...]] = MappingProxyType(dict(pairing or {}))
        self._handles: list[Any] = []
        self._features: dict[str, dict[str, _Capture]] = {}
        self._names: dict[str, list[str]] = {}
        self._warned: set[str] = set()  # student paths already warned about (captured without a gradient)

    def student_layers(self, teacher: str) -> tuple[str, ...]:
        """The student paths paired with ``teacher``'s hooked layers, in order."""
        return self.pairing.get(teacher, self.spec.get(STUDENT, ()))

    def sync(self, on: bool, models: Mapping[str, nn.Module], copy: bool = False) -> None:
        """Attach the hooks to ``models`` if ``on`` (and there are any), else remove them and drop the features.

        Idempotent: a second call with the same ``on`` changes nothing. With ``copy`` the hooks store copies.
        """
        if on and self.spec and not self._handles:
            student = {id(m) for m in models[STUDENT].modules()} if STUDENT in models else set()
            for model_name, paths in self.spec.items():
                store = self._features.setdefault(model_name, {})
                modules = dict(models[model_name].named_modules())
                self._names[model_name] = list(modules)
                self._handles += [modules[split_hook_path(path)[0]].register_forward_hook(_FeatureHook(
                    store, path, copy, model_name, own_run_only=model_name != STUDENT and id(
                        modules[split_hook_path(path)[0]]) in student)) for path in paths]
        elif not on and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._features.clear()

    def captured(self, model: str = STUDENT, stage: Optional[str] = None) -> Mapping[str, Tensor]:
        """``{path: tensor}`` of ``model`` from its latest forward (read-only); empty while detached.

        Raises:
            DistillationStepError: a capture is not a tensor (naming the path, the type and the selectors that
                would take a tensor out of it), a selector did not apply, or a tensor was modified in place after
                its capture (naming the path, the enclosing and the next submodule, and the copy option).
        """
        store = self._features.get(model, {})
        problems = [p for path, capture in store.items() for p in self._problems(model, path, capture, stage)]
        if problems:
            raise DistillationStepError(problems, stage=stage, when="a step")
        return MappingProxyType({path: capture.value for path, capture in store.items()})

    def captured_named(self, model: str, teachers: Optional[Sequence[str]], stage: Optional[str]) -> Mapping[str, Tensor]:
        """:meth:`captured`, after refusing a ``model`` that is neither the student nor one of ``teachers`` (when
        known), with a did-you-mean."""
        if teachers is not None and model != STUDENT and model not in teachers:
            raise DistillationStepError(StageProblem(
                "is neither 'student' nor a teacher", name=f"stage {stage!r}" if stage is not None else
                "the current stage", field="captured_features.model", value=model,
                hint=did_you_mean(str(model), [STUDENT, *teachers]) or f"the teachers are: {', '.join(teachers)}"),
                stage=stage, when="a step")
        return self.captured(model, stage)

    def _problems(self, model: str, path: str, capture: _Capture, stage: Optional[str]) -> list[StageProblem]:
        where = f"stage {stage!r}" if stage is not None else "the current stage"
        field = f"configure_feature_hooks.{model}"
        value = capture.value
        if capture.failed is not None or not isinstance(value, Tensor):
            module = split_hook_path(path)[0]
            source = capture.raw if capture.raw is not None else value  # the module's output, or the selection
            base = module if capture.raw is not None else path
            options = [f"`{base}{sel}`" for sel in ([""] if isinstance(source, Tensor) else tensor_selectors(source))][:6]
            got = f"the selector {capture.failed}" if capture.failed is not None else \
                f"captured a {type(value).__name__}, not a tensor"
            return [StageProblem(got, name=where, field=field, value=path,
                                 hint=("select a tensor: " + ", ".join(options)) if options else
                                 f"the output of `{module}` holds no tensor; hook another submodule")]
        if capture.version is not None and value._version != capture.version:
            module = split_hook_path(path)[0]
            names = self._names.get(model, [])
            parent = module.rpartition(".")[0]
            later = [n for n in names[names.index(module) + 1:] if not n.startswith(module + ".")] \
                if module in names else []
            around = f"the enclosing `{parent}`" if parent else "the enclosing module"
            nxt = f" or the next submodule `{later[0]}`" if later else ""
            return [StageProblem(
                f"its output was modified in place after capture (tensor version {capture.version} -> "
                f"{value._version}), e.g. by `out += identity` or `ReLU(inplace=True)` later in the forward, so it "
                "no longer holds this module's output", name=where, field=field, value=path,
                hint=f"hook {around}{nxt}, whose output is what the in-place ops produce, or set "
                "`copy_features = True` on the module to copy each feature at capture")]
        return []

    def paired_losses(self, teachers: Sequence[str], teacher: Optional[str],
                      adapters: Optional[Mapping[str, Callable[[Tensor], Tensor]]],
                      loss_fn: Callable[[Tensor, Tensor], Tensor], stage: Optional[str]) -> dict[str, Tensor]:
        """:func:`~lightning_stages.losses.paired_feature_losses` of the student with ``teacher`` (default: every
        teacher with hooked layers or that the student's per-teacher entry pairs layers with, else the first), as
        ``DistillationModule.feature_losses`` returns them.

        Raises:
            DistillationStepError: as :meth:`captured`, ``teacher`` is not a teacher (with a did-you-mean), an adapter
                is keyed by no paired student layer, two pairs get the same loss name, or the pairs do not match
                (naming the pair and the stage).
        """
        where = f"stage {stage!r}" if stage is not None else "the current stage"
        if teacher is not None and teacher not in teachers:
            raise DistillationStepError(StageProblem(
                "is not a teacher", name=where, field="feature_losses.teacher", value=teacher,
                hint=did_you_mean(str(teacher), list(teachers)) or f"the teachers are: {', '.join(teachers)}"),
                stage=stage, when="a step")
        # every teacher with hooked layers, and every teacher the student's per-teacher entry pairs layers with
        names = [teacher] if teacher is not None else \
            [t for t in teachers if self.spec.get(t) or self.pairing.get(t)] or [next(iter(teachers), "teacher")]
        student = self.captured(STUDENT, stage)
        if torch.is_grad_enabled():
            self._warn_without_grad(where)
        paired = list(dict.fromkeys(path for t in teachers for path in self.student_layers(t))) if adapters else []
        for key in adapters or {}:  # an adapter no pair of any teacher uses would never run (nor train)
            if key not in paired:
                raise DistillationStepError(StageProblem(
                    f"is not a student layer paired with a teacher ({paired}), so its adapter would never run",
                    name=where, field="feature_losses.adapters", value=key,
                    hint=did_you_mean(str(key), paired) or "key each adapter by a student hook path as hooked"),
                    stage=stage, when="a step")
        losses: dict[str, Tensor] = {}
        for name in names:
            try:
                own = self.student_layers(name)
                found = paired_feature_losses(
                    student, self.captured(name, stage), own, self.spec.get(name, ()), loss_fn=loss_fn,
                    adapters={k: v for k, v in adapters.items() if k in own} if adapters else None, teacher=name)
            except DistillationStepError:  # the capture's own (a selector that does not fit the output): as it is
                raise
            except ValueError as err:
                raise DistillationStepError(StageProblem(str(err), name=where), stage=stage) from err
            if clash := next((key for key in found if key in losses), None):  # one loss would replace the other
                raise DistillationStepError(StageProblem(
                    "gives two layer pairs of different teachers the same loss name, so one would replace the other",
                    name=where, field="configure_feature_hooks", value=clash,
                    hint="hook layers whose paths differ by more than selectors and characters loggers refuse"),
                    stage=stage, when="a step")
            losses.update(found)
        return losses

    def _warn_without_grad(self, where: str) -> None:
        """Warn, once per layer, that a student layer's capture has no gradient while the loss needs one."""
        for path, capture in self._features.get(STUDENT, {}).items():
            if capture.without_grad and path not in self._warned:
                self._warned.add(path)
                rank_zero_warn(f"feature distillation in {where}: the student's hooked layer {path!r} ran without "
                               "autograd (inside torch.utils.checkpoint(..., use_reentrant=True) or torch.no_grad()), "
                               "so its feature loss trains nothing before it; use use_reentrant=False, or hook a layer "
                               "outside the checkpointed block")

    def put(self, features: Mapping[str, Mapping[str, Any]]) -> None:
        """Put features that did not come from a forward (a teacher cache's) where :meth:`captured` reads them."""
        for model_name, captured in features.items():
            store = self._features.get(model_name)
            if store is not None:
                store.update({path: _Capture(value) for path, value in captured.items()})

    def defer(self, models: Sequence[str], placeholder: Callable[[dict[str, Any], str], Any]) -> list[str]:
        """Put ``placeholder(store, path)`` where :meth:`captured` reads each hooked path of those ``models`` that have
        hooks (a teacher cache's batch whose features are computed only if read); returns those models."""
        hooked = [name for name in models if self.spec.get(name) and name in self._features]
        for name in hooked:
            store: dict[str, Any] = self._features[name]
            store.update({path: placeholder(store, path) for path in self.spec[name]})
        return hooked

    def snapshot(self, models: Sequence[str], stage: Optional[str] = None) -> dict[str, dict[str, Any]]:
        """A copy of what the hooks of ``models`` captured, for the models that have hooks, checked as
        :meth:`captured` checks it."""
        return {name: dict(self.captured(name, stage)) for name in models if self.spec.get(name)}
