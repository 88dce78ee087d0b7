"""The teachers as ``configure_teachers`` returns them, checked (:func:`build_teachers`), then frozen: eval mode and
no gradient for what is theirs alone (:func:`freeze_teachers`). A module a teacher shares with the student (one
embedding object in both) stays the student's: trained, in the student's mode. A teacher that contains the student
itself is refused."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

from torch import nn
from torch.nn.parameter import is_lazy

from lightning_stages.distillation.hook_specs import STUDENT
from lightning_stages.errors import StageConfigError, StageProblem

__all__ = ["build_teachers", "freeze_teachers", "student_in_teacher"]


def student_in_teacher(name: str, teacher: nn.Module, student: Optional[nn.Module], where: str) -> Optional[StageProblem]:
    """The problem of a teacher that is or contains ``student`` (``{"teacher": self}``): freezing it would freeze the
    student, and following the student's device or dtype would recurse without end."""
    if student is None or not any(module is student for module in teacher.modules()):
        return None
    return StageProblem(f"teacher {name!r} contains the student itself; a teacher must be a model of its own (modules "
                        "it shares with the student are fine)", name=where, field="configure_teachers",
                        value=type(teacher).__name__)


def freeze_teachers(teachers: Mapping[str, nn.Module], student: Optional[nn.Module]) -> dict[str, str]:
    """Put each teacher in eval mode and stop its parameters' gradients, except the modules and parameters it shares
    with ``student``, which keep the student's mode and gradients. A teacher that is itself one of the student's
    submodules is frozen whole, as the user named it a teacher. Parameters are frozen one by one (a TorchScript
    module has no ``requires_grad_``).

    Returns:
        ``{teacher: the path of its first parameter the student trains}`` for each teacher that shares one: its
        outputs change at every step, which a teacher cache cannot serve.

    Example::

        >>> shared = nn.Linear(2, 2)
        >>> student, teacher = nn.Sequential(shared), nn.Sequential(shared, nn.Linear(2, 1))
        >>> freeze_teachers({"t": teacher}, student)
        {'t': '0.weight'}
        >>> shared.weight.requires_grad, shared.training, teacher[1].weight.requires_grad, teacher[1].training
        (True, True, False, False)
    """
    owned = {id(module) for module in student.modules()} if student is not None else set()
    trained = {id(parameter) for parameter in student.parameters()} if student is not None else set()
    shared: dict[str, str] = {}
    for name, teacher in teachers.items():
        whole = id(teacher) in owned or not any(id(module) in owned for module in teacher.modules())
        if whole:
            teacher.eval()
        else:  # only its own modules: eval() would reach the shared ones
            for module in teacher.modules():
                if id(module) not in owned:
                    module.training = False
        for path, parameter in teacher.named_parameters():
            if whole or id(parameter) not in trained:
                parameter.requires_grad_(False)
            elif parameter.requires_grad:
                shared.setdefault(name, path)
    return shared


def build_teachers(configure_teachers: Callable[[], Any], where: str,
                   student: Optional[nn.Module] = None) -> dict[str, nn.Module]:
    """Call ``configure_teachers`` and check what it returned: a non-empty mapping (an ``nn.ModuleDict`` too) of
    names (not ``"student"``) to modules, none of which contains ``student``.

    Raises:
        StageConfigError: ``configure_teachers`` raised, or returned something else; naming ``where`` and every
            bad name or value.

    Example::

        >>> sorted(build_teachers(lambda: {"big": nn.Linear(1, 1)}, "stage 0"))
        ['big']
        >>> build_teachers(lambda: {"student": nn.Linear(1, 1)}, "stage 0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem ...: teacher names must be strings other than 'student'
    """
    try:
        teachers = configure_teachers()
    except Exception as err:
        raise StageConfigError(StageProblem(f"configure_teachers() raised {type(err).__name__}: {err}", name=where,
                                            field="configure_teachers", value=None)) from err
    if isinstance(teachers, nn.ModuleDict):
        teachers = dict(teachers.items())
    if not isinstance(teachers, Mapping) or not teachers:
        raise StageConfigError(StageProblem(
            ("distillation is on but configure_teachers() returned no teachers" if not teachers or isinstance(
                teachers, Mapping) else f"must return a mapping of teacher names to modules, not a {type(teachers).__name__}")
            + "; return a mapping such as {'teacher': model}", name=where, field="configure_teachers",
            value=type(teachers).__name__ if isinstance(teachers, nn.Module) else teachers))
    problems: list[StageProblem] = []
    for name, teacher in teachers.items():
        if not isinstance(name, str) or name == STUDENT:
            problems.append(StageProblem(f"teacher names must be strings other than {STUDENT!r}", name=where,
                                         field="configure_teachers", value=name))
        if not isinstance(teacher, nn.Module):
            problems.append(StageProblem(f"teacher {name!r} must be an nn.Module, not {type(teacher).__name__}",
                                         name=where, field="configure_teachers", value=teacher))
        elif (inside := student_in_teacher(str(name), teacher, student, where)) is not None:
            problems.append(inside)
        elif any(is_lazy(t) for t in (*teacher.parameters(), *teacher.buffers())):  # freezing it would raise
            problems.append(StageProblem(f"teacher {name!r} has uninitialized parameters (an nn.Lazy* module); run it "
                            "once on an example batch in configure_teachers()", name=where, field="configure_teachers",
                            value=type(teacher).__name__))
    if problems:
        raise StageConfigError(problems)
    return dict(teachers)
