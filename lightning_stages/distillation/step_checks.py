"""The checks of a training step: finite distillation losses, the DDP zero term, and the guard that runs them once
per stage (one host sync and one graph walk per stage, none per step)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_stages.distillation.unused_parameters import keep_in_graph
from lightning_stages.errors import DistillationStepError, StageProblem

__all__ = ["StageGuard", "check_finite", "ddp_needs_every_parameter", "named_losses", "stage_where"]


def stage_where(stage_name: Optional[str]) -> str:
    """The stage in force as a step-time message names it (the mixin knows its name, not its index).

    Example::

        >>> stage_where("distill"), stage_where(None)
        ("stage 'distill'", 'the current stage')
    """
    return f"stage {stage_name!r}" if stage_name is not None else "the current stage"


def named_losses(losses: Union[Mapping[str, Tensor], Sequence[Tensor], Tensor]) -> list[tuple[str, Tensor]]:
    """Distillation losses given as a mapping, a sequence or one tensor, as ``(name, value)`` pairs.

    Example::

        >>> [name for name, _ in named_losses([torch.tensor(1.0), torch.tensor(2.0)])]
        ['distill_losses[0]', 'distill_losses[1]']
    """
    if isinstance(losses, Tensor):
        return [("distill_losses", losses)]
    if isinstance(losses, Mapping):
        return [(str(k), v) for k, v in losses.items()]
    return [(f"distill_losses[{i}]", v) for i, v in enumerate(losses)]


def check_finite(named: Sequence[tuple[str, Tensor]], stage: Optional[str], epoch: Optional[int]) -> None:
    """Raise if a distillation loss is NaN or infinite. One host sync per loss: call once per stage, not per step.

    Raises:
        DistillationStepError: naming each loss that is not finite, the epoch and the stage.

    Example::

        >>> check_finite([("kd", torch.tensor(0.5))], "distill", 0)
        >>> check_finite([("kd", torch.tensor(float("nan")))], "distill", 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_stages.errors.DistillationStepError: 1 problem at the first step of stage 'distill':
          - stage 'distill': `distill_losses.kd` = nan: is not finite at epoch 3, ...
    """
    problems = []
    for name, value in named:
        value = torch.as_tensor(value).detach()
        if not bool(torch.isfinite(value).all()):
            shown = value.item() if value.numel() == 1 else "a tensor with non-finite entries"
            problems.append(
                StageProblem(
                    f"is not finite at epoch {epoch}, the first training step of the stage; check the teacher's "
                    "outputs, the temperature and the inputs of this loss",
                    name=stage_where(stage), field=f"distill_losses.{name}", value=shown,
                )
            )
    if problems:
        raise DistillationStepError(problems, stage=stage)


def ddp_needs_every_parameter(trainer: Any) -> bool:
    """Whether the module trains under DDP without ``find_unused_parameters``: every parameter needs a gradient.

    Example::

        >>> ddp_needs_every_parameter(None)
        False
    """
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return isinstance(model, DistributedDataParallel) and not model.find_unused_parameters


class StageGuard:
    """Knows whether a step is the first of its stage, and the parameters that stage's loss leaves unused.

    The stage is identified by a key (the mixin uses the stage name, the distillation switch and the Trainer).
    On every step of a stage, :meth:`keep` adds the zero-weighted term that keeps the unused parameters in the
    graph, so each DDP rank's backward reaches every parameter; with none recorded it adds nothing.

    Example::

        >>> guard = StageGuard()
        >>> guard.enter(("distill", True)), guard.enter(("distill", True)), guard.enter(("finetune", False))
        (True, False, True)
        >>> w = torch.ones(2, requires_grad=True)
        >>> guard.unused = (w,)
        >>> guard.keep(torch.tensor(3.0)).item()
        3.0
    """

    __slots__ = ("_key", "unused")

    def __init__(self) -> None:
        self._key: Optional[Hashable] = None
        #: trainable parameters the current stage's loss does not reach (recorded under DDP only)
        self.unused: tuple[Tensor, ...] = ()

    def enter(self, key: Hashable) -> bool:
        """Whether ``key`` starts a new stage; if so, remember it and forget the previous stage's parameters."""
        if self._key is not None and self._key == key:
            return False
        self._key, self.unused = key, ()
        return True

    def keep(self, total: Tensor) -> Tensor:
        """``total`` plus a zero that depends on :attr:`unused` (``total`` itself when there are none)."""
        return keep_in_graph(total, self.unused) if self.unused else total
