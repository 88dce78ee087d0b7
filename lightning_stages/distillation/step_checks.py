"""The checks of a training step: finite distillation losses, the DDP zero term, and the guard that runs them once
per stage (one host sync and one graph walk per stage, none per step); and the watch that sees a non-finite training
loss at every step without a tensor operation or a host sync, read before a checkpoint is written."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_stages.distillation.unused_parameters import keep_in_graph
from lightning_stages.errors import DistillationStepError, StageProblem

__all__ = ["NonFiniteRange", "NonFiniteWatch", "StageGuard", "check_finite", "ddp_needs_every_parameter", "named_losses", "stage_where"]


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


def check_finite(named: Sequence[tuple[str, Tensor]], stage: Optional[str], epoch: Optional[int],
                 trainer: Any = None) -> None:
    """Raise if a distillation loss is NaN or infinite. One host sync per loss: call once per stage, not per step.

    With a ``trainer`` of more than one process (DDP), the verdict is gathered over the ranks (one collective), so
    that every rank raises at this step: one rank raising alone would leave the others waiting in the backward's
    gradient reduction.

    Raises:
        DistillationStepError: naming each loss that is not finite, the epoch and the stage (on the other ranks:
            the ranks where a loss was not finite).

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
    if getattr(trainer, "world_size", 1) > 1:
        flags = trainer.strategy.all_gather(torch.tensor(float(bool(problems)), device=trainer.strategy.root_device))
        ranks = [rank for rank, flag in enumerate(flags.reshape(-1).tolist()) if flag]
        if ranks and not problems:
            problems.append(StageProblem(
                f"is not finite on rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} at epoch {epoch}, the "
                "first training step of the stage (every rank stops here); see that rank's error",
                name=stage_where(stage), field="distill_losses", value="not finite"))
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

    The stage is identified by a key (the mixin uses its ``stage_token``, the stage name, the distillation switch and
    the Trainer).
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


_NONE = torch.iinfo(torch.int64).max  # "no non-finite loss" in the watch's device-side record


@dataclass(frozen=True)
class NonFiniteRange:
    """What :meth:`NonFiniteWatch.check` found: non-finite losses among the batches watched since the last check.

    Args:
        first_bad: the batch index (within its epoch) of the first non-finite loss, over every process.
        first: the first batch index watched since the last check.
        last: the last batch index watched.
        first_step, last_step: the Trainer's ``global_step`` after the first and the last batch watched.
    """

    first_bad: int
    first: int
    last: int
    first_step: int
    last_step: int

    def error(self, epoch: int, when: str, index: Optional[int] = None, name: Optional[str] = None
              ) -> DistillationStepError:
        """The error that stops the run, naming the stage (``index``, ``name``), the epoch and the batches.

        Example::

            >>> print(NonFiniteRange(3, 0, 7, 17, 24).error(2, "at the end of the epoch", 1, "kd"))  # doctest: +ELLIPSIS
            1 problem at epoch 2 of stage 'kd':
              - stage 1 ('kd'): the training loss was not finite (NaN or infinite) at batch 3 of epoch 2 (found at ...
        """
        return DistillationStepError(
            StageProblem(
                f"the training loss was not finite (NaN or infinite) at batch {self.first_bad} of epoch {epoch} "
                f"(found {when}; batches {self.first}..{self.last} were watched, global steps "
                f"{self.first_step}..{self.last_step}); the run stops before any checkpoint holds the weights "
                "trained on it: the last checkpoint written before is kept",
                index=index, name=name,
                hint="check the learning rate, the inputs and the losses of this stage, then resume from that "
                "checkpoint",
            ),
            stage=name, when=f"epoch {epoch}",
        )


class NonFiniteWatch:
    """A record of non-finite training losses that costs no tensor operation at a step: each step keeps its loss
    (the caller hands over a tensor nothing writes again: Lightning's copy under automatic optimization), and every ``fold_every`` steps the kept losses are folded
    into a device-side record with a few tensor operations (no host sync). :meth:`check` folds the rest and reads the
    record once (one sync; under DDP one ``all_gather``, so every rank sees the same).

    Example::

        >>> watch = NonFiniteWatch()
        >>> for batch, loss in enumerate([1.0, 2.0, float("nan"), 3.0]):
        ...     watch.update(torch.tensor(loss), batch, step=10 + batch)
        >>> watch.check()
        NonFiniteRange(first_bad=2, first=0, last=3, first_step=10, last_step=13)
        >>> watch.update(torch.tensor(0.5), 4, step=14); watch.check().first_bad  # what was found stays found
        2
        >>> watch = NonFiniteWatch()
        >>> watch.update(torch.tensor(0.5), 0, step=1); watch.check() is None  # each good check starts a new range
        True
    """

    __slots__ = ("_batches", "_first", "_first_bad", "_found", "_last", "_losses", "fold_every")

    def __init__(self, fold_every: int = 256) -> None:
        self.fold_every = fold_every  # losses kept between folds (memory: one small tensor each)
        self._losses: list[Tensor] = []  # the losses since the last fold, and their batch indices
        self._batches: list[int] = []
        self._first_bad: Optional[Tensor] = None  # the batch index of the first non-finite loss, or _NONE
        self._first: Optional[tuple[int, int]] = None  # (batch index, global step) of the first batch watched
        self._last: tuple[int, int] = (0, 0)
        self._found: Optional[NonFiniteRange] = None  # once found, every later check says so (the weights stay bad)

    def update(self, loss: Any, batch: int, step: int) -> None:
        """Keep ``loss`` (a tensor; anything else is ignored) for the next fold; no tensor operation but a detach.
        The batch counts as watched either way (every DDP rank runs the same batches, with or without a loss)."""
        if self._first is None:
            self._first = (batch, step)
        self._last = (batch, step)
        if not isinstance(loss, Tensor):
            return
        self._losses.append(loss.detach() if loss.requires_grad else loss)
        self._batches.append(batch)
        if len(self._losses) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        """Fold the kept losses into the record: the least batch index among the non-finite ones (no host sync)."""
        if not self._losses:
            return
        losses, first = self._losses, self._losses[0]
        if all(loss.dim() == 0 and loss.dtype == first.dtype and loss.device == first.device for loss in losses):
            finite = torch.isfinite(torch.stack(losses))  # the usual case: scalar losses of one dtype, two operations
        else:  # non-scalar losses, or dtypes that changed (no conversion: not every device has every dtype)
            finite = torch.stack([torch.isfinite(loss).all().to(first.device) for loss in losses])
        batches = torch.tensor(self._batches, dtype=torch.int64, device=first.device)
        bad = torch.where(finite, _NONE, batches).min()
        self._first_bad = bad if self._first_bad is None else torch.minimum(self._first_bad, bad)
        self._losses, self._batches = [], []

    def check(self, gather: Optional[Callable[[Tensor], Tensor]] = None, device: Optional[torch.device] = None
              ) -> Optional[NonFiniteRange]:
        """The non-finite losses since the last check (``None``: every loss was finite, and a new range starts);
        once some are found, every later check returns them (the weights trained on them stay in the module).

        Args:
            gather: the strategy's ``all_gather`` under DDP, so that every rank decides alike (every rank must call
                ``check`` then); ``None`` on one process.
            device: where the record is made for a rank whose batches gave no loss tensor (it still joins ``gather``).
        """
        self._fold()
        if self._found is not None or self._first is None:
            return self._found  # no collective here: every rank ran the same batches, so every rank returns alike
        record = self._first_bad if self._first_bad is not None else torch.tensor(_NONE, device=device)
        first_bad = record if gather is None else gather(record).min()
        (first, first_step), (last, last_step) = self._first, self._last
        self._first_bad, self._first = None, None
        bad = int(first_bad.item())  # the one host sync
        if bad != _NONE:
            self._found = NonFiniteRange(bad, first, last, first_step, last_step)
        return self._found
