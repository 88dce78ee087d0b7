"""Teachers: checking what ``configure_teachers`` returned and the cost options, freezing, placing (offload) and
running them (precision, offload, teacher cache)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_stages.distillation.feature_hooks import (
    STUDENT,
    FeatureHooks,
    check_hook_spec,
    student_pairing,
)
from lightning_stages.distillation.step_checks import stage_where
from lightning_stages.distillation.teacher_cache import TeacherCache, teacher_fingerprint
from lightning_stages.distillation.teacher_changes import refuse_random_teachers, registrations, warn_sequence_first
from lightning_stages.distillation.teacher_inputs import (
    containers_copied,
    deferred_run,
    forward_named,
    teacher_calls,
)
from lightning_stages.distillation.teacher_options import (  # re-exported: imported from here too
    AUTOCAST_DTYPES,
    OFFLOAD_MODES,
    autocast_in_force,
    check_cost_options,
    refuse_sharded_strategy,
    wants_offload,
)
from lightning_stages.distillation.teacher_setup import build_teachers, freeze_teachers
from lightning_stages.errors import DistillationStepError, StageConfigError, StageProblem

__all__ = ["AUTOCAST_DTYPES", "OFFLOAD_MODES", "Teachers", "autocast_in_force", "build_teachers", "check_cost_options",
           "module_device", "prepare", "refuse_sharded_strategy", "wants_offload"]

def _keep_on_own_device(fn: Callable[[Tensor], Tensor], tensor: Tensor) -> Tensor:
    """``fn(tensor)``, except that a change of device is dropped (a change of dtype is kept): tried on an empty one."""
    probe = fn(tensor.new_empty(0))
    if probe.device == tensor.device:
        return fn(tensor)
    return tensor.to(dtype=probe.dtype) if probe.dtype != tensor.dtype else tensor


@contextlib.contextmanager
def _named_stage(stage: Optional[str]) -> Iterator[None]:
    """The teacher cache's own checks, raised as step-time problems of ``stage``."""
    try:
        yield
    except StageConfigError as err:
        raise DistillationStepError(
            [StageProblem(p.message, name=stage_where(stage), value=p.value, hint=p.hint,
                          field=p.field if p.name is None else f"{p.name}.{p.field}")
             for p in err.problems], stage=stage, when="a training step") from err


class _LiveFeature:
    """A hooked teacher feature of a batch that the cache served without features (``store_features=False``): the
    first read runs the hooked teachers on that batch (``run``, once for all of its features), whose hooks then hold
    the real captures; it never stands for another batch's feature."""

    __slots__ = ("_path", "_run", "_store")

    def __init__(self, store: dict[str, Any], path: str, run: Callable[[], None]) -> None:
        self._store, self._path, self._run = store, path, run

    def _capture(self) -> Any:
        if self._store.get(self._path) is self:
            self._run()
        capture = self._store.get(self._path)
        return None if capture is self else capture  # the hook did not fire on this batch's forward

    def __getattr__(self, name: str) -> Any:  # value, raw, failed, version: those of the live capture
        return getattr(self._capture(), name, None)


class Teachers:
    """The prepared teachers of one module: frozen, in eval mode, with the module or offloaded to CPU.

    Args:
        modules: ``{name: teacher}``, as returned by :func:`checked_teachers`; frozen and put in eval mode here.
        device: the module's device, where the teachers go (``None``: leave them where they are).
        student: the student; modules a teacher shares with it are not frozen (:func:`.freeze_teachers`).

    Example::

        >>> teachers = Teachers({"t": nn.Linear(2, 1)}, device=None)
        >>> teachers.modules["t"].weight.requires_grad, teachers.modules["t"].training
        (False, False)
        >>> sorted(teachers.run((torch.ones(3, 2),), {}, precision=None, device=lambda: torch.device("cpu")))
        ['t']
    """

    def __init__(self, modules: dict[str, nn.Module], device: Optional[torch.device],
                 student: Optional[nn.Module] = None) -> None:
        self.shared = freeze_teachers(modules, student)  # not the modules shared with the student: {teacher: path}
        # the student's modules that a teacher holds: the student places them (an offload must not move them)
        self._student_parts = {id(m) for m in student.modules()} if student is not None else set()
        self.modules = modules
        if device is not None:
            self._move(device)
        self.offloaded = False  #: whether ``offload_teachers`` keeps them on CPU now
        #: the ``extra`` (precision, autocast) and the fingerprint the teacher cache was last bound to (by this module)
        self._bound_extra: Optional[dict[str, Any]] = None
        self._bound_key: Optional[str] = None
        self._watched: list[Tensor] = []  # the teachers' parameters and buffers at that binding
        self._versions: Optional[list[int]] = None  # and their version counters then
        self._registrations = -1  # weights set on any module then (registrations())
        self._modes: tuple[bool, ...] = ()  # and the teachers' modes

    def place(self, offload: bool, device: torch.device) -> None:
        """Move the teachers to CPU (``offload``) or back to ``device``; nothing if they are there already."""
        if offload != self.offloaded:
            self._move(torch.device("cpu") if offload else device)
            self.offloaded = offload

    def _move(self, device: torch.device) -> None:
        """Move the teachers to ``device``, but not the modules the student holds too (a shared embedding)."""
        for teacher in self.modules.values():
            if not any(id(m) in self._student_parts for m in teacher.modules()):
                teacher.to(device)
            else:
                for module in teacher.modules():
                    if id(module) not in self._student_parts:
                        module._apply(lambda t: t.to(device), recurse=False)

    def follow_dtype_of(self, student: nn.Module) -> None:
        """Convert the teachers' floating-point weights and buffers to the ``student``'s floating-point dtype when all
        of its parameters share one other than the default: teachers built after the student was converted
        (``Trainer(precision="bf16-true")`` or ``"64-true"`` convert it before the callback builds them, and
        ``model.half()`` before a fit) follow it, as later conversions do through :meth:`follow`."""
        dtypes = {p.dtype for p in student.parameters() if p.is_floating_point()}
        if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.get_default_dtype():
            for teacher in self.modules.values():
                teacher.to(dtype=dtype)

    def follow(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> None:
        """Apply a module's ``_apply`` function: offloaded teachers follow dtype changes, not device moves."""
        for teacher in self.modules.values():
            if self.offloaded:
                teacher._apply(lambda t: _keep_on_own_device(fn, t), recurse)
            else:
                teacher._apply(fn, recurse)

    def run(self, args: tuple, kwargs: Mapping[str, Any], precision: Optional[str],
            device: Callable[[], torch.device], inputs: Optional[Mapping[str, Any]] = None,
            stage: Optional[str] = None, names: Optional[list[str]] = None) -> dict:
        """Every teacher (or those in ``names``) on ``args``/``kwargs`` (or its own entry of ``inputs``, see :func:`teacher_calls`) under
        ``torch.no_grad()``; brought back to ``device()`` first if offloaded, and run under ``torch.autocast`` on its
        type if ``precision`` says so.

        Raises:
            DistillationStepError: ``inputs`` does not name every teacher, or a teacher's forward raised a
                ``TypeError``, ``ValueError``, ``IndexError``, ``KeyError``, ``AttributeError`` or a ``RuntimeError``
                other than running out of memory (a shape or dtype that does not fit); it names teacher and stage.
        """
        calls = teacher_calls(list(self.modules), args, kwargs, inputs, stage)
        if self.offloaded:
            self.place(False, device())
        dtype = AUTOCAST_DTYPES.get(precision)
        shared = inputs is None and len(calls) > 1
        run = [(name, t) for name, t in self.modules.items() if names is None or name in names]
        with torch.no_grad():
            if dtype is None:
                return {name: forward_named(name, t, calls[name], stage, shared) for name, t in run}
            with torch.autocast(device().type, dtype=dtype):
                return {name: forward_named(name, t, calls[name], stage, shared) for name, t in run}

    def run_cached(
        self, cache: TeacherCache, sample_index: Any, args: tuple, kwargs: Mapping[str, Any], *, hooks: FeatureHooks,
        precision: Optional[str], device: Callable[[], torch.device], bind: bool, stage: Optional[str],
        inputs: Optional[Mapping[str, Any]] = None,
    ) -> dict[str, Any]:
        """The teachers' outputs from ``cache`` if every sample is stored (their features put into ``hooks``), else
        :meth:`run` and store the outputs and features. With ``store_features=False`` a stored batch's hooked
        teacher features are computed by running the hooked teachers on this batch when first read.

        Args:
            bind: first bind the cache to a fingerprint of the teachers, their hooked layers, ``precision`` and the
                autocast in force (:func:`autocast_in_force`); it is bound again whenever that autocast changes.
            inputs: per-teacher inputs, as :meth:`run` takes them.
            stage: the stage in force, named in errors.

        Raises:
            DistillationStepError: ``sample_index`` is ``None``, or the cache refuses the batch (e.g. its layout
                changed between batches); the message names the stage.
        """
        if sample_index is None:
            raise DistillationStepError(StageProblem(
                "is set but the batch carries no sample index, so stored teacher outputs cannot be matched to samples",
                name=stage_where(stage), field="teacher_cache", value=cache,
                hint="pass the batch's dataset indices as run_teachers(..., sample_index=indices), e.g. from a dataset "
                "wrapped in IndexedDataset, or set teacher_cache = None"), stage=stage)
        given = (args, kwargs) if inputs is None else inputs  # what the teachers read, for the cache's input check
        with _named_stage(stage):
            # the autocast in force changes the outputs: a Trainer's bf16-mixed, or the caller's own autocast
            place = device()
            extra = {"precision": precision, "autocast": str(autocast_in_force(place.type, precision))}
            if bind or extra != self._bound_extra or cache.fingerprint != self._bound_key or self._changed():
                self._refuse_shared(cache, stage)
                refuse_random_teachers(self.modules, stage)
                layers = {name: hooks.spec.get(name, ()) for name in self.modules}
                warn_sequence_first(self.modules, layers, cache.store_features)
                cache.bind(teacher_fingerprint(self.modules, layers, extra, version=cache.version))
                self._bound_extra, self._bound_key = extra, cache.fingerprint
                self._watched = [t for m in self.modules.values() for t in (*m.parameters(), *m.buffers())]
                self._versions = self._current_versions()
                self._registrations, self._modes = registrations(), self._current_modes()
            hit = cache.lookup(sample_index, device=place, inputs=given)
        if hit is not None:
            outputs, features = hit
            hooks.put(features)
            if not cache.store_features:  # the features are computed when first read, from the inputs as now
                args, kwargs, inputs = containers_copied((args, kwargs, inputs))
                self._defer_features(hooks, deferred_run(
                    lambda names: self.run(args, kwargs, precision, device, inputs=inputs, stage=stage, names=names),
                    (args, kwargs) if inputs is None else inputs, place.type, stage))
            return outputs
        outputs = self.run(args, kwargs, precision, device, inputs=inputs, stage=stage)
        features = hooks.snapshot(list(self.modules), stage) if cache.store_features else {}
        with _named_stage(stage):
            cache.store(sample_index, outputs, features, inputs=given)
        return outputs


    def _refuse_shared(self, cache: TeacherCache, stage: Optional[str]) -> None:
        """A teacher that shares a module the student trains computes other outputs at every step: no stored row
        would be valid (the cache would drop its rows and run it at every step, without a word)."""
        if self.shared:  # the first such teacher is named
            name, path = next(iter(self.shared.items()))
            raise DistillationStepError(StageProblem(
                f"is set, but teacher {name!r} shares a module the student trains ({name}.{path}), so its outputs "
                "change at every step and a stored row would be stale at once", name=None, field="teacher_cache",
                value=cache, hint="set teacher_cache = None: the teacher then runs at every "
                "step, on the shared module as the student trains it"), stage=stage, when="a training step")

    def _current_versions(self) -> Optional[list[int]]:
        try:
            return [tensor._version for tensor in self._watched]
        except RuntimeError:  # an inference tensor has no version counter
            return None

    def _current_modes(self) -> tuple[bool, ...]:
        return tuple(teacher.training for teacher in self.modules.values())

    def _changed(self) -> bool:
        """Whether the teachers changed since the cache was bound to them: their weights or buffers written in place
        (``load_state_dict``, an EMA update under ``no_grad``; a write through ``.data`` moves no counter) or replaced
        (``load_state_dict(assign=True)``, a new submodule: looked at only when some module got a new weight), or a
        teacher put in another mode (``teacher.train()``)."""
        if (registered := registrations()) != self._registrations:
            self._registrations = registered
            now = [t for m in self.modules.values() for t in (*m.parameters(), *m.buffers())]
            if len(now) != len(self._watched) or any(a is not b for a, b in zip(now, self._watched)):
                return True
        if self._current_modes() != self._modes:
            return True
        return self._versions is not None and self._current_versions() != self._versions

    def _defer_features(self, hooks: FeatureHooks, run: Callable[[list[str]], Any]) -> None:
        """Replace every hooked teacher feature in ``hooks`` by a :class:`_LiveFeature` of this batch."""
        hooked: list[str] = []
        done: list[bool] = []

        def run_once() -> None:
            if not done:
                done.append(True)
                run(hooked)

        hooked += hooks.defer(list(self.modules), lambda store, path: _LiveFeature(store, path, run_once))


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


def module_device(module: nn.Module, teachers: Optional[Teachers]) -> torch.device:
    """The device of ``module``'s first parameter; else of the first teacher's; else CPU.

    Example::

        >>> module_device(nn.Linear(1, 1), None)
        device(type='cpu')
    """
    first = next(module.parameters(), None)
    if first is None and teachers is not None:
        first = next((p for t in teachers.modules.values() for p in t.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def prepare(
    student: nn.Module, configure_teachers: Callable[[], Any], configure_feature_hooks: Callable[[], Any], where: str
) -> tuple[Teachers, FeatureHooks]:
    """Build and check the teachers and the hook spec; freeze the teachers and put them on ``student``'s device.

    Raises:
        StageConfigError: as :func:`build_teachers` and :func:`~.feature_hooks.check_hook_spec`.

    Example::

        >>> student = nn.Sequential(nn.Linear(2, 2))
        >>> teachers, hooks = prepare(student, lambda: {"t": nn.Linear(2, 2)}, lambda: {"student": "0"}, "stage 0")
        >>> sorted(teachers.modules), dict(hooks.spec)
        (['t'], {'student': ('0',)})
    """
    modules = build_teachers(configure_teachers, where, student)
    raw_spec = configure_feature_hooks() or {}
    spec = check_hook_spec(raw_spec, {STUDENT: student, **modules}, where)
    if spec:
        let_compile_see_hooks()
    per_teacher = spec and isinstance(raw_spec.get(STUDENT), Mapping)  # else the student's list pairs with each
    pairing = student_pairing(raw_spec, list(modules)) if per_teacher else {}
    teachers = Teachers(modules, device=next((p.device for p in student.parameters()), None), student=student)
    teachers.follow_dtype_of(student)
    return teachers, FeatureHooks(spec, pairing)
