"""The ``DistillationModule`` mixin: teachers that exist only when a stage needs them.

The face only; the work is done by :mod:`.teachers`, :mod:`.feature_hooks`, :mod:`.step_checks` and
:mod:`lightning_stages.losses`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stages.distillation.feature_hooks import STUDENT, FeatureHooks
from lightning_stages.distillation.step_checks import StageGuard, check_finite, named_losses, stage_where
from lightning_stages.distillation.step_checks import ddp_needs_every_parameter as _ddp_needs_every_parameter
from lightning_stages.distillation.teacher_cache import TeacherCache
from lightning_stages.distillation.teachers import Teachers, check_cost_options, module_device, prepare, wants_offload
from lightning_stages.distillation.unused_parameters import unreached_parameters
from lightning_stages.errors import DistillationStepError, StageConfigError, StageProblem
from lightning_stages.losses import weighted_sum

__all__ = ["STUDENT", "DistillationModule"]


class _DistillationState:
    """What the mixin keeps per module. Lives outside ``nn.Module``'s registries on purpose."""

    def __init__(self) -> None:
        self.teachers: Optional[Teachers] = None  # None until prepared
        self.hooks = FeatureHooks()
        self.use_distillation = False
        self.cache_bound = False  # False: bind the teacher cache to the teachers' fingerprint at its next use
        self.guard = StageGuard()


class DistillationModule:
    """Mixin for a ``LightningModule`` that learns from one or more teachers in some stages.

    Put it before ``LightningModule`` in the bases. Override :meth:`configure_teachers` (and optionally
    :meth:`configure_feature_hooks`); add :class:`~lightning_stages.StageScheduleCallback` to the Trainer.
    The callback calls :meth:`configure_teachers` once per fit, at setup, and only if the base flag or a stage
    needs teachers; it turns :attr:`use_distillation` on and off per stage.

    Teachers are frozen, in eval mode and follow the module to its device, but are not submodules (not in
    ``state_dict()``, checkpoints, the optimizer or DDP). Feature hooks exist only while a stage distills.

    Cost options are the class attributes ``teacher_precision``, ``offload_teachers`` and ``teacher_cache`` (or set
    them in ``__init__``); without any of them :meth:`run_teachers` is a plain ``torch.no_grad()`` loop. Offloaded
    teachers stay on CPU when the module moves (``.to(device)``) and come back at the next distilling stage.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import lightning.pytorch as pl
        >>> class Student(DistillationModule, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.adapter = nn.Linear(4, 3), nn.Linear(3, 5)
        ...         self.loss_weights = {"cls": 1.0}
        ...     def configure_teachers(self):
        ...         return {"teacher": nn.Sequential(nn.Linear(4, 5))}
        ...     def configure_feature_hooks(self):
        ...         return {"student": ["body"], "teacher": ["0"]}
        >>> model = Student(); model.prepare_teachers(); model.use_distillation = True
        >>> x = torch.ones(2, 4)
        >>> _ = model.body(x); sorted(model.run_teachers(x))
        ['teacher']
        >>> sorted(model.feature_losses(adapters={"body": model.adapter}))
        ['body__teacher.0']
        >>> model.lambda_coef = 0.5
        >>> float(model.weighted_loss({"cls": torch.tensor(2.0)}, {"kd": torch.tensor(4.0)}))  # 1 * 2 + 0.5 * 4
        4.0
        >>> "teacher" in str(list(model.state_dict()))
        False
    """

    #: distillation coefficient in force; the callback sets it per stage
    lambda_coef: float = 1.0
    #: name of the stage in force; the callback sets it per stage
    stage_name: Optional[str] = None
    #: an opaque value that changes with the stage in force (the callback sets it); the checks of a stage's first
    #: step run again whenever it, the stage name or the distillation switch changes
    stage_token: Any = None
    #: autocast precision of the teachers' forward: None (run them as they are), "bf16-mixed" or "16-mixed"
    teacher_precision: Optional[str] = None
    #: move teachers to CPU while unused: False, True / "after_last" (no current or later stage distills), "idle"
    offload_teachers: Union[bool, str] = False
    #: a TeacherCache of teacher outputs and features per sample, so later distilling epochs skip the teachers;
    #: needs ``run_teachers(x, sample_index=...)``
    teacher_cache: Optional[TeacherCache] = None
    #: copy each hooked feature at capture, so in-place ops later in the forward (``out += identity``,
    #: ``ReLU(inplace=True)``) cannot change it; without it such a change is refused when the feature is read
    copy_features: bool = False

    def configure_teachers(self) -> Mapping[str, nn.Module]:
        """Build (or load) the teachers: ``{teacher name: module}``. Called at most once per fit, at setup, and only
        when a stage or the base flag needs teachers: load weights here (:func:`~lightning_stages.load_teacher_checkpoint`),
        not in ``__init__``, so that a schedule without distillation never reads them."""
        return {}

    def configure_feature_hooks(self) -> Mapping[str, Any]:
        """Which submodules' outputs to capture: ``{"student": [...], "<teacher name>": [...]}``, dotted paths as in
        ``named_modules()``, optionally ending in selectors for outputs that are not one tensor
        (``"encoder.layer.3[0]"``, ``"encoder:last_hidden_state"``). The student's entry may be ``{teacher name:
        [...]}`` to pair its layers with each teacher's separately. Read them with :meth:`captured_features`;
        :meth:`feature_losses` pairs them."""
        return {}


    @property
    def _distillation_state(self) -> _DistillationState:
        state = self.__dict__.get("_ls_distillation")
        if state is None:
            state = self.__dict__["_ls_distillation"] = _DistillationState()
        return state

    @property
    def use_distillation(self) -> bool:
        """Whether the distillation loss is on now. Set by the callback per stage; settable by hand."""
        return self._distillation_state.use_distillation

    @use_distillation.setter
    def use_distillation(self, value: bool) -> None:
        state = self._distillation_state
        if bool(value) == state.use_distillation:
            return
        state.use_distillation = bool(value)
        if value:
            state.cache_bound = False  # the teacher cache checks the teachers again at its next use
        self._sync_hooks()

    @property
    def teachers(self) -> Mapping[str, nn.Module]:
        """The prepared teachers (read-only view); empty until prepared."""
        teachers = self._distillation_state.teachers
        return MappingProxyType(teachers.modules if teachers is not None else {})

    @property
    def teachers_prepared(self) -> bool:
        """Whether :meth:`configure_teachers` has been called for this module."""
        return self._distillation_state.teachers is not None

    @property
    def teachers_offloaded(self) -> bool:
        """Whether ``offload_teachers`` keeps the teachers on CPU now (they come back before a distilling stage)."""
        teachers = self._distillation_state.teachers
        return teachers is not None and teachers.offloaded

    def captured_features(self, model: str = STUDENT) -> Mapping[str, Tensor]:
        """``{hook path: tensor}`` captured by the hooks of ``model`` (``"student"`` or a teacher's name) at its
        latest forward; empty while not distilling.

        Raises:
            DistillationStepError: ``model`` is no teacher's name (once they are prepared), a capture is not a tensor
                (the message lists selectors that would work), or it was changed in place (see ``copy_features``).
        """
        return self._distillation_state.hooks.captured_named(model, list(self.teachers) or None, self.stage_name)

    def prepare_teachers(self, needed_by: Optional[str] = None) -> None:
        """Build the teachers with :meth:`configure_teachers`, freeze them and check the feature hooks.

        Does nothing if they are already prepared. The callback calls this at setup, with ``needed_by`` the stage
        that needs teachers (named in errors); call it by hand only when training without the callback.

        Raises:
            StageConfigError: ``configure_teachers`` raised or returned no teachers, a teacher is not an
                ``nn.Module``, a hook path names no submodule, or ``teacher_precision``, ``offload_teachers`` or
                ``teacher_cache`` has an unknown value.
        """
        state = self._distillation_state
        where = needed_by or "the base settings"
        check_cost_options(self.teacher_precision, self.offload_teachers, self.teacher_cache, where)
        state.cache_bound = False  # each fit checks the teacher cache against the teachers again
        if state.teachers is not None:
            return
        if not isinstance(self, nn.Module) or type(self)._apply is not DistillationModule._apply:
            name = type(self).__name__
            raise StageConfigError(StageProblem(f"{name} must list DistillationModule before LightningModule in its "
                                                f"bases: write `class {name}(DistillationModule, LightningModule)`"))
        state.teachers, state.hooks = prepare(self, self.configure_teachers, self.configure_feature_hooks, where)
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        """Attach the feature hooks while distilling, remove them (and drop features) otherwise. Idempotent."""
        state = self._distillation_state
        if state.teachers is not None:
            state.hooks.sync(state.use_distillation, {STUDENT: self, **state.teachers.modules},  # type: ignore[dict-item]
                             copy=bool(self.copy_features))

    def _module_device(self) -> torch.device:
        # a LightningModule's device, which Lightning keeps as it moves the module: no walk over the parameters at
        # every step; another module's first parameter's (see module_device)
        device = getattr(self, "device", None)
        if isinstance(device, torch.device):
            return device
        return module_device(self, self._distillation_state.teachers)  # type: ignore[arg-type]

    def update_teacher_placement(self, distills_now: bool, distills_later: bool = False) -> None:
        """Offload the teachers to CPU or bring them back to the module's device, as ``offload_teachers`` says.

        The callback calls this at every stage application (``distills_now``: the current stage distills;
        ``distills_later``: a later one does); call it by hand only without the callback.

        Raises:
            StageConfigError: ``offload_teachers`` is not one of ``False``, ``True``, ``"after_last"``, ``"idle"``.

        Example::

            >>> import lightning.pytorch as pl
            >>> class Student(DistillationModule, pl.LightningModule):
            ...     offload_teachers = "idle"
            ...     def configure_teachers(self):
            ...         return {"teacher": nn.Linear(2, 2)}
            >>> model = Student(); model.net = nn.Linear(2, 2); model.prepare_teachers()
            >>> model.update_teacher_placement(distills_now=False, distills_later=True)
            >>> _ = model.to("meta")  # stands in for an accelerator: offloaded teachers stay on CPU
            >>> model.teachers_offloaded, model.teachers["teacher"].weight.device.type
            (True, 'cpu')
            >>> model.update_teacher_placement(distills_now=True)
            >>> model.teachers_offloaded, model.teachers["teacher"].weight.device.type
            (False, 'meta')
        """
        teachers, mode = self._distillation_state.teachers, self.offload_teachers
        if teachers is None or (not mode and not teachers.offloaded):
            return
        teachers.place(wants_offload(mode, distills_now, distills_later, stage_where(self.stage_name)),
                       self._module_device())

    def run_teachers(self, *args: Any, sample_index: Any = None, inputs: Optional[Mapping[str, Any]] = None,
                     **kwargs: Any) -> dict[str, Any]:
        """Run every teacher on the given inputs without autograd, while distilling.

        A ``torch.no_grad()`` loop (:class:`~lightning_stages.distillation.teachers.Teachers`), under
        ``torch.autocast`` with ``teacher_precision``, after bringing back offloaded teachers. With a
        ``teacher_cache``, a training step whose samples are all stored reads outputs and features from it instead;
        other training steps run the teachers and store the results; evaluation steps just run them.

        Args:
            *args: the teachers' inputs, with ``**kwargs``; the same for every teacher.
            inputs: instead, each teacher's own: ``{name: (args...)}``, ``{name: {kwargs}}`` or ``{name: tensor}``.
            sample_index: the dataset indices of the batch's samples (one per row, e.g. from
                :class:`~lightning_stages.IndexedDataset`). Needed with ``teacher_cache``; ignored otherwise.

        Returns:
            ``{teacher name: its output}`` (ordinary tensors, usable in the loss); ``{}`` when not distilling.

        Raises:
            DistillationStepError: ``teacher_cache`` without ``sample_index``, a batch the cache refuses, ``inputs``
                not naming every teacher, or a teacher's forward raising on its inputs (naming teacher and stage).
        """
        state = self._distillation_state
        if not state.use_distillation:
            return {}
        if state.teachers is None:
            self.prepare_teachers()
        teachers: Teachers = state.teachers  # type: ignore[assignment]
        cache = self.teacher_cache if self.training else None  # type: ignore[attr-defined]
        if cache is None:
            return teachers.run(args, kwargs, self.teacher_precision, self._module_device, inputs=inputs,
                                stage=self.stage_name)
        outputs = teachers.run_cached(cache, sample_index, args, kwargs, hooks=state.hooks, bind=not state.cache_bound,
                                      precision=self.teacher_precision, device=self._module_device,
                                      stage=self.stage_name, inputs=inputs)
        state.cache_bound = True
        return outputs

    def weighted_loss(
        self,
        task_losses: Mapping[str, Tensor],
        distill_losses: Union[Mapping[str, Tensor], Sequence[Tensor], Tensor, None] = None,
    ) -> Tensor:
        """``sum(w_k * L_k) + lambda_coef * sum(distill_losses)`` (:func:`~lightning_stages.losses.weighted_sum`),
        the last term only while distilling.

        On the first training step of each stage the distillation losses must be finite (one host sync per stage)
        and, under DDP, the parameters the stage leaves unused get a zero-weighted term on each of its steps, so
        DDP needs no ``find_unused_parameters=True`` (:mod:`~lightning_stages.distillation.step_checks`).

        Args:
            task_losses: ``{loss name: value}``; every name must be a key of ``self.loss_weights``.
            distill_losses: distillation losses (mapping, sequence or one tensor); ignored when not distilling.

        Raises:
            DistillationStepError: a task loss has no weight, there is no loss at all, or a distillation loss is
                not finite at the first step of a stage (naming the loss, the epoch and the stage).
        """
        distill = distill_losses if self._distillation_state.use_distillation else None
        try:
            total = weighted_sum(task_losses, getattr(self, "loss_weights", None) or {}, distill, self.lambda_coef)
        except ValueError as err:
            raise DistillationStepError(StageProblem(str(err), name=stage_where(self.stage_name)),
                                        stage=self.stage_name, when="a step") from err
        if total.requires_grad:  # a training step (not validation, not under no_grad)
            total = self._guard_stage(total, named_losses(distill) if distill is not None else [])
        return total

    def _guard_stage(self, total: Tensor, named: list[tuple[str, Tensor]]) -> Tensor:
        """On the first step of a stage (its token, name, the distillation switch or the Trainer changed): the
        finite check and, under DDP, the walk for unused parameters; on every step, their zero term. The DDP test and
        the walk are names of this module so that tests can run the DDP path on one process."""
        trainer = getattr(self, "_trainer", None)
        guard = self._distillation_state.guard
        if guard.enter((self.stage_token, self.stage_name, self._distillation_state.use_distillation, id(trainer))):
            check_finite(named, self.stage_name, getattr(trainer, "current_epoch", None), trainer)
            if _ddp_needs_every_parameter(trainer):
                guard.unused = tuple(unreached_parameters(total, self.parameters()))  # type: ignore[attr-defined]
        return guard.keep(total)

    def feature_losses(
        self,
        adapters: Optional[Mapping[str, Callable[[Tensor], Tensor]]] = None,
        teacher: Optional[str] = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
    ) -> dict[str, Tensor]:
        """Feature-distillation losses of every hooked layer pair, keyed ``"<student path>__<teacher>.<path>"``
        (:func:`~lightning_stages.losses.paired_feature_losses`, in the order ``configure_feature_hooks`` lists
        them). Call it after the student's forward and :meth:`run_teachers`; ``{}`` when not distilling.

        Args:
            adapters: ``{student path: module}`` mapping that layer's features to the teacher's shape.
            teacher: the teacher to pair with; default: every teacher with hooked layers.
            loss_fn: ``loss_fn(student_features, teacher_features)``; mean squared error by default.

        Raises:
            DistillationStepError: the layers do not pair up, a layer captured nothing or no tensor, a feature was
                changed in place after capture, an adapter fails or is keyed by no paired student layer, two pairs
                share a loss name, or a pair's shapes differ after its adapter (naming pair and shapes).
        """
        state = self._distillation_state
        if not state.use_distillation:
            return {}
        return state.hooks.paired_losses(list(self.teachers), teacher, adapters, loss_fn, self.stage_name)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        teachers = self._distillation_state.teachers
        if teachers is not None:
            teachers.follow(fn, recurse)
        return result

    def __getstate__(self) -> dict[str, Any]:
        # deep copies (StochasticWeightAveraging) and pickles (ddp_spawn) never carry the teachers
        state = dict(super().__getstate__())  # type: ignore[misc]
        state.pop("_ls_distillation", None)
        return state
