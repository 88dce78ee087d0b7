"""What may reach a checkpoint, and what is read back from one.

* :class:`CheckpointGuard`, the base of :class:`~lightning_stages.StageScheduleCallback`: watches the loss of every
  training step on the device (:class:`~lightning_stages.distillation.step_checks.NonFiniteWatch`, no host sync) and
  stops the run before a checkpoint is written after a non-finite loss, or of weights that are not finite (a finite
  loss whose gradient was not: :func:`nonfinite_weight`).
* :func:`warn_about_saved_schedule`: the schedule saved in a checkpoint, compared with the one given now; damaged
  state only warns, and a string there is never opened as a file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stages.distillation.step_checks import NonFiniteWatch
from lightning_stages.errors import DistillationStepError, StageConfigError, StageProblem
from lightning_stages.schedule import StageSchedule

__all__ = ["CheckpointGuard", "nonfinite_weight", "warn_about_saved_schedule"]


class CheckpointGuard(Callback):
    """No checkpoint is ever written after a NaN or infinite training loss.

    The loss ``training_step`` returns is watched at every step on the device; the watch is read (one host sync,
    gathered over DDP ranks so that every rank decides alike) before any checkpoint is written, in
    ``on_save_checkpoint``, so Lightning never writes it, at the end of every validation of a fit, and wherever the
    subclass calls :meth:`stop_if_nonfinite` (the callback: at every epoch end). A non-finite loss stops the run with a
    :class:`~lightning_stages.DistillationStepError` naming the stage in force (the module's ``stage_name`` and the
    index the callback puts first in its ``stage_token``), the epoch and the batches; the checkpoints written before
    are kept as they were. Once found, it stays found until the next fit (:meth:`watch_afresh`). Before a checkpoint
    the weights themselves are read too (one pass over them, one sync): a finite loss whose gradient was NaN or
    infinite leaves every loss finite up to that step, and non-finite weights after it.

    Example::

        >>> guard = CheckpointGuard()
        >>> guard.watch_afresh()
    """

    _nonfinite: NonFiniteWatch

    def watch_afresh(self, trainer: Optional[pl.Trainer] = None) -> None:
        """Start a new watch (at the start of a fit: the weights are loaded or kept, and watched from here). With
        ``trainer``, its weights-only saves (``ModelCheckpoint(save_weights_only=True)``,
        ``trainer.save_checkpoint(path, weights_only=True)``) read the watch too: Lightning runs no callback's
        ``on_save_checkpoint`` for those."""
        self._nonfinite = NonFiniteWatch()
        self.__dict__.pop("_looked_at", None)  # the step the watch was last read at for a due ModelCheckpoint
        self.unmute(trainer)
        if trainer is not None:
            trainer.__dict__["save_checkpoint"] = _GuardedSave(self, trainer)

    def unmute(self, trainer: Optional[pl.Trainer] = None) -> None:
        """Give back ``save_on_exception`` to each ``ModelCheckpoint`` that :meth:`on_exception` muted: this guard's,
        and those of ``trainer`` that any guard muted."""
        muted = list(self.__dict__.pop("_muted", []))
        muted += [c for c in getattr(trainer, "checkpoint_callbacks", []) if c.__dict__.get(_MUTED)]
        for callback in muted:
            if callback.__dict__.pop(_MUTED, False):
                callback.save_on_exception = True

    def _watch(self) -> NonFiniteWatch:
        if "_nonfinite" not in self.__dict__:
            self.watch_afresh()
        return self._nonfinite

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and not pl_module.automatic_optimization:
            # Lightning hands over a copy only under automatic optimization; a manual training_step's loss may be a
            # buffer it writes again before the watch reads it
            loss = loss.detach().clone()
        self._watch().update(loss, batch_idx, trainer.global_step)
        step = trainer.global_step
        if self.__dict__.get("_looked_at") != step and any(_due(c, step) for c in trainer.checkpoint_callbacks):
            # before ModelCheckpoint(every_n_train_steps=n) takes this step's checkpoint for its best (or last) and
            # then is refused it: it would name a file that was never written (one sync per n optimizer steps)
            self.__dict__["_looked_at"] = step
            self.stop_if_nonfinite(trainer, pl_module, "before writing a checkpoint", weights=True)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # raising here, while the checkpoint is being assembled, means it is never written
        self.stop_if_nonfinite(trainer, pl_module, "before writing a checkpoint", weights=True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A ``ModelCheckpoint(save_on_exception=True)`` would take its refused save (see :class:`_GuardedSave`) for
        written, and with ``save_last="link"`` point ``last.ckpt`` at that missing file: a resume from "last" would
        start from scratch. After a non-finite loss or with non-finite weights it does not save for this fit (Lightning
        runs checkpoint callbacks' hooks after the others)."""
        exceptional = [c for c in trainer.checkpoint_callbacks if getattr(c, "save_on_exception", False) is True
                       and _will_save_on_exception(c, trainer)]
        if not exceptional:  # no collective unless a save (which reads the watch alike) is coming anyway
            return
        try:
            self.stop_if_nonfinite(trainer, pl_module, "while the run stops", weights=True)
        except DistillationStepError as err:
            for callback in exceptional:
                callback.save_on_exception = False  # type: ignore[attr-defined]  # set back right after (below)
                callback.__dict__[_MUTED] = True  # and by any guard's next fit, should the trainer be gone
            self.__dict__.setdefault("_muted", []).extend(exceptional)
            _unmute_after_checkpoint_hooks(trainer, self)
            rank_zero_warn("StageScheduleCallback: ModelCheckpoint(save_on_exception=True) does not save while the "
                           f"run stops: its weights would not be finite ({err.problems[0].message})")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before weights trained on a NaN are scored, so that nothing acts on their metrics: ModelCheckpoint's top-k
        # (which would name as its best a checkpoint it is then refused), EarlyStopping (in whatever place of the
        # callback list: at the end of a validation Lightning runs callbacks in the user's order), restore_best
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.stop_if_nonfinite(trainer, pl_module, "before a validation", weights=True)

    def stop_if_nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str, weights: bool = False
                          ) -> None:
        """Raise if a training loss since the last look was not finite, or (``weights``: before weights are written)
        a trainable parameter of the module is not (every rank must call it alike).

        Raises:
            DistillationStepError: naming the stage, the epoch, the first bad batch and the batches watched; or the
                first non-finite parameter and the global step.
        """
        gather = trainer.strategy.all_gather if trainer.world_size > 1 else None
        found = self._watch().check(gather, trainer.strategy.root_device)
        token = getattr(pl_module, "stage_token", None)
        index = token[0] if isinstance(token, tuple) and token and isinstance(token[0], int) else None
        name = getattr(pl_module, "stage_name", None)
        if found is not None:
            raise found.error(trainer.current_epoch, when, index, name)
        bad = nonfinite_weight(pl_module, gather, trainer.strategy.root_device) if weights else None
        if bad is not None:
            raise DistillationStepError(StageProblem(
                f"the weights are not finite ({bad} holds NaN or infinite values) at global step "
                f"{trainer.global_step} of epoch {trainer.current_epoch}, although no loss `training_step` returned "
                f"was (found {when}): a gradient was not (a square root, norm or log of zero, an overflow), the loss "
                "was not returned (manual optimization), or something other than the optimizer wrote them; the run "
                "stops before any checkpoint holds them: the last checkpoint written before is kept",
                index=index, name=name,
                hint="find the operation (`Trainer(detect_anomaly=True)` names it), then resume from that checkpoint"),
                stage=name, when=f"epoch {trainer.current_epoch}")


def nonfinite_weight(module: torch.nn.Module, gather: Optional[Callable[[Tensor], Tensor]] = None,
                     device: Optional[torch.device] = None) -> Optional[str]:
    """The first trainable parameter of ``module`` that holds a NaN or infinite value, quoted (``None``: all are
    finite; buffers and frozen parameters are not read, since an attention mask may hold ``-inf`` on purpose). One
    pass over the weights (:func:`_each_finite`) and one host sync, and a second of each only when a sum is not
    finite; under DDP (``gather``, the strategy's ``all_gather``, which every rank must call alike, as it does here:
    each rank takes the second pass from the same gathered verdict) a rank whose own weights are finite names
    another rank's.

    Example::

        >>> layer = torch.nn.Linear(2, 1)
        >>> nonfinite_weight(layer) is None
        True
        >>> _ = layer.bias.data.fill_(float("inf"))
        >>> nonfinite_weight(layer)
        '`bias`'
    """
    named = [(name, p.detach()) for name, p in module.named_parameters()  # not buffers: a float mask may hold -inf
             if p.requires_grad and (p.is_floating_point() or p.is_complex()) and p.layout == torch.strided
             and not p.is_meta and not isinstance(p, torch.nn.parameter.UninitializedParameter)]  # LazyLinear's
    place = device if device is not None or not named else named[0][1].device

    def anywhere(finite: Tensor) -> tuple[Tensor, bool]:  # this rank's verdict, and every rank's (a host sync)
        bad_here = (~finite).any().to(torch.int64)
        return bad_here, bool((gather(bad_here).max() if gather is not None else bad_here).item())

    _, bad = anywhere(_each_finite(named, place, summed=True))
    if not bad:
        return None
    # a sum that is not finite: a NaN or an infinity, or finite values whose sum overflows; each value decides (every
    # rank comes here alike, from the same gathered verdict)
    finite = _each_finite(named, place, summed=False)
    bad_here, bad = anywhere(finite)
    if not bad:
        return None
    if not bool(bad_here.item()):
        return "a weight of another process"
    return f"`{named[int(torch.nonzero(~finite)[0].item())][0]}`"


_WIDER_SUM = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
_SUMMED = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128})


def _each_finite(named: list[tuple[str, Tensor]], place: Optional[torch.device], summed: bool) -> Tensor:
    """Per weight, a bool on ``place``: whether its values are all finite, or (``summed``) whether their sum is.

    A sum is never finite for a weight that holds a NaN or an infinity (NaN and infinities survive a sum, and +inf and
    -inf make NaN), and rarely also not for a finite one whose sum overflows (16-bit weights are summed in float32).
    A sum reads the weight once, with no temporary of its size: on a CPU about 20 to 40 times faster than
    ``isfinite(weight).all()`` (0.13 against 3 to 5 ms for 1.2 million float32 values). float8 weights (which
    ``isfinite`` refuses, or reads wrong: float8_e8m0fnu's NaN) and complex32 ones are read as float32 and complex64
    values."""
    if not named:
        return torch.ones(0, dtype=torch.bool, device=place)

    def read(t: Tensor) -> Tensor:  # one weight at a time: a float8 weight's float32 copy lives only for its check
        if t.dtype not in _SUMMED:
            return t.to(torch.complex64 if t.is_complex() else torch.float32)
        return t.sum(dtype=_WIDER_SUM.get(t.dtype)) if summed else t

    return torch.stack([torch.isfinite(read(t)).all().to(place) for _, t in named])


_MUTED = "_lightning_stages_muted_save_on_exception"


def _will_save_on_exception(callback: Any, trainer: pl.Trainer) -> bool:
    """Whether ``ModelCheckpoint`` will save in its ``on_exception`` (not: already saved at this step, the sanity
    check, ``fast_dev_run``): only then is the watch read, since only then does Lightning's save wait for every rank
    anyway; a rank-local error must not wait in a gather the other ranks never join."""
    should = getattr(callback, "_should_save_on_exception", None)
    return bool(should(trainer)) if callable(should) else True


def _unmute_after_checkpoint_hooks(trainer: pl.Trainer, guard: CheckpointGuard) -> None:
    """Set ``save_on_exception`` back once the checkpoint callbacks' ``on_exception`` have run: Lightning calls the
    strategy's ``on_exception`` right after them."""
    strategy = trainer.strategy
    if "on_exception" in strategy.__dict__:
        return
    def on_exception(exception: BaseException) -> None:
        del strategy.__dict__["on_exception"]
        guard.unmute(trainer)
        strategy.on_exception(exception)
    strategy.__dict__["on_exception"] = on_exception


def _due(callback: Any, step: int) -> bool:
    """Whether ``callback`` is a ``ModelCheckpoint`` due to save at the end of this batch (``every_n_train_steps``, a
    private attribute of Lightning's; ``train_time_interval`` cannot be told in advance)."""
    every = getattr(callback, "_every_n_train_steps", 0)
    return isinstance(every, int) and every >= 1 and step % every == 0 and step > 0


class _GuardedSave:
    """``trainer.save_checkpoint`` that reads the guard's watch first when it writes the weights only (picklable, for
    ``ddp_spawn``). A save made while the run stops on an error (``OnExceptionCheckpoint``) after a non-finite loss
    is not written, with a warning: raising there would replace the error the run stops on and skip Lightning's
    clean-up (the loggers' ``finalize("failed")``, the strategy's teardown)."""

    def __init__(self, guard: CheckpointGuard, trainer: pl.Trainer) -> None:
        self.guard, self.trainer = guard, trainer

    def __call__(self, filepath: Any, weights_only: Optional[bool] = None, storage_options: Optional[Any] = None
                 ) -> None:
        # Lightning's handler of the error that stops a run: the status says so, and the stage is not reset yet
        stopping = self.trainer.state.status == TrainerStatus.INTERRUPTED and self.trainer.state.stage is not None
        if weights_only or stopping:
            try:
                self.guard.stop_if_nonfinite(self.trainer, self.trainer.lightning_module, "before writing a checkpoint",
                                             weights=True)
            except DistillationStepError as err:
                if not stopping:
                    raise
                why = err.problems[0].message
                what = "are not finite" if why.startswith("the weights") else "were trained on a non-finite loss"
                rank_zero_warn(f"StageScheduleCallback: the checkpoint {str(filepath)!r} is not written while the run "
                               f"stops: its weights {what} ({why})")
                return
        type(self.trainer).save_checkpoint(self.trainer, filepath, weights_only, storage_options)  # a subclass's own


def warn_about_saved_schedule(state: Any, current: StageSchedule) -> None:
    """Warn if the schedule saved in a checkpoint (``state["schedule"]``) differs from ``current``, naming every
    change, or if it cannot be read (``null``, a list, a string, garbage): resume goes on with ``current`` either way.
    Only a mapping is read: a string is never taken for a file to open.

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_about_saved_schedule({"schedule": "/etc/passwd"}, StageSchedule())
        >>> "could not be read" in str(caught[0].message)
        True
    """
    saved = state.get("schedule") if isinstance(state, Mapping) else state
    try:
        if not isinstance(saved, Mapping):
            raise StageConfigError(StageProblem(f"it is {type(saved).__name__}, not a mapping", field="schedule",
                                                value=saved))
        schedule = StageSchedule.from_config(saved)
        changes = schedule.diff(current)
    except (StageConfigError, TypeError, ValueError, OverflowError, RecursionError) as err:
        rank_zero_warn(f"StageScheduleCallback: the schedule saved in the checkpoint could not be read ({err}); "
                       "resuming with the schedule given now.")
        return
    if changes:
        rank_zero_warn(
            "StageScheduleCallback: the schedule differs from the one in the checkpoint; resuming with the one "
            "given now. Changes (checkpoint -> now): " + "; ".join(changes)
        )
