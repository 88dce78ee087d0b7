"""Per-stage training data: rebuild Lightning's training dataloader exactly where a stage's ``data`` changes.

Lightning builds the training dataloader before ``on_train_start`` and, when it must, again at the start of an
epoch *before* ``on_train_epoch_start`` runs. So the stage of the next epoch is resolved at the end of the previous
one (the schedule is a pure function of the epoch), ``stage_data`` is set then, and the fit loop is told to build
the loader again: dropping its combined loader makes ``fit_loop.setup_data()`` call ``train_dataloader()`` at the
next epoch start, whatever ``reload_dataloaders_every_n_epochs`` says.

In a schedule in optimizer steps, a change of ``data`` ends the running epoch at the boundary, and the new stage
starts a new epoch with its own loader. The batch whose optimizer step reaches the boundary is made the epoch's last
(``batch_progress.is_last_batch``, set before its training step, so Lightning steps the optimizer and the
epoch-interval LR schedulers on it as on any epoch's last batch). A plateau that ends a step stage at a validation
right after an optimizer step ends the epoch there (the epoch-interval LR schedulers are stepped as Lightning would
have at that batch). The epoch's end then builds the new loader, as above; ``global_step`` keeps counting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher
from lightning.pytorch.loops.loop import _Loop

from lightning_stages.errors import StageConfigError, StageProblem
from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.stage import ResolvedStage

__all__ = ["TrainData", "finish_resumed_epoch", "resumed_epoch", "step_data_problems"]

_UNKNOWN = object()


def resumed_epoch(checkpoint: Mapping[str, Any]) -> Optional[int]:
    """The epoch a run resumed from ``checkpoint`` trains next (its fit loop's processed epochs), ``None`` if unknown.

    A checkpoint written at an epoch's end has counted that epoch as processed; one written inside an epoch has not,
    and the run resumes inside it. Either way the count is the epoch that trains next.

    Example::

        >>> resumed_epoch({"loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 3}}}}})
        3
        >>> resumed_epoch({}) is None
        True
    """
    value: Any = checkpoint
    for key in ("loops", "fit_loop", "epoch_progress", "current", "processed"):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def step_data_problems(trainer: pl.Trainer, schedule: StageSchedule) -> list[StageProblem]:
    """What cannot work (checked before the first batch): a schedule whose ``data`` changes, trained on loaders given
    to ``fit`` (``train_dataloaders=``: there is no ``train_dataloader()`` to build them again with the new
    ``stage_data``), or a step schedule whose ``data`` changes, trained by a ``training_step`` that takes
    ``dataloader_iter`` (Lightning then decides an epoch's last batch itself after every step, from the iterator, so
    the epoch cannot be ended at the boundary); and the stages of a step schedule that the run never reaches
    (:func:`unreached_step_problems`).
    """
    problems = unreached_step_problems(trainer, schedule)
    source = trainer.fit_loop._data_source
    if source.instance is not None and not source.is_module():
        reason = ("but the training dataloaders were given to `fit`, so no `train_dataloader()` can build the new "
                  "data", "define `train_dataloader()` in the LightningModule or a LightningDataModule and read "
                  "`stage_data` there, or give every stage the same `data`")
    elif schedule.unit == "step" and isinstance(trainer.fit_loop._data_fetcher, _DataLoaderIterDataFetcher):
        reason = ("but `training_step` takes `dataloader_iter`, whose epoch cannot be ended at a step",
                  "take `batch` in `training_step`, or give every stage in steps the same `data`")
    else:
        return problems
    for before, after in pairwise(schedule.timeline()):
        if before.data != after.data:
            index = after.index if after.index is not None else before.index
            name = schedule.stages[index].name if index is not None else None
            problems.append(StageProblem(
                f"changes the training data at {schedule.unit} {after.start_epoch} ({before.data!r} -> "
                f"{after.data!r}), {reason[0]}", index=index, name=name, field="data",
                value=after.data if after.index is not None else before.data, hint=reason[1]))
    return problems


def unreached_step_problems(trainer: pl.Trainer, schedule: StageSchedule) -> list[StageProblem]:
    """The stages of a step schedule that start at or after the last optimizer step of a run that only ``max_epochs``
    bounds (no ``max_steps``): they would never run, as a stage in epochs that starts at ``max_epochs``. Counted
    from this fit's loader (``ceil(batches / accumulate_grad_batches)`` steps an epoch); not when the count can
    change (a stage's own ``data``, a reload of the loaders, a loader without a length, manual optimization)."""
    batches, max_epochs, max_steps = trainer.num_training_batches, trainer.max_epochs, trainer.max_steps
    reloads: int = getattr(trainer, "reload_dataloaders_every_n_epochs", 0)  # set by Lightning's data connector
    if (schedule.unit != "step" or (max_steps is not None and max_steps >= 0) or max_epochs is None or max_epochs < 0
            or not math.isfinite(batches) or not batches or reloads or not trainer.lightning_module.automatic_optimization
            or any(stage.data is not None for stage in schedule.stages)):
        return []
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    return [StageProblem(
        f"starts at or after the run's last optimizer step: the Trainer stops after max_epochs={max_epochs} epochs of "
        f"{per_epoch} optimizer steps ({max_epochs * per_epoch} steps; no max_steps is set), so it would never run",
        index=index, name=stage.name, field="start_step", value=stage.start_step,
        hint="set the Trainer's max_steps, or raise max_epochs")
        for index, stage in enumerate(schedule.stages) if (stage.start_step or 0) >= max_epochs * per_epoch]


def finish_resumed_epoch(trainer: pl.Trainer, data_changes: bool, at_epoch_end: bool) -> None:
    """At the start of a fit resumed from a checkpoint written at an epoch's end: start the next epoch, from its
    loader's first batch, as the run that never stopped does. ``data_changes``: the position the run resumes at
    trains on other ``data`` than the one before it (the loader was built for the next stage).

    Two such checkpoints:

    * written in ``on_train_epoch_end`` (such as the end of an epoch that a change of ``data`` cut), handled when
      ``at_epoch_end`` (a step schedule): Lightning (2.6) restarts iteration-based training (``max_steps``) inside the
      finished epoch; without a validation due there, it trains one batch more in that epoch, and the epochs after it
      shift;
    * written in ``on_train_batch_end`` of the epoch's last batch (``ModelCheckpoint(every_n_train_steps=...)``, a
      ``last.ckpt``) where the data changes (a step or an epoch schedule): Lightning counts the finished epoch's
      batches against the *next* loader and, when that one is longer, resumes inside it, skipping as many of its
      batches (or ending its first epoch that much early).

    Here the finished epoch is counted as completed and the loops start afresh (nothing of the finished epoch is
    left to run); in the second case the loader, built with the finished epoch's position restored, is built again.
    """
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    at_batch_end = data_changes and epoch_loop.restarted_on_train_batch_end and fit_loop.restarted_mid_epoch
    if not (epoch_loop.batch_progress.is_last_batch and ((at_epoch_end and fit_loop.restarted_on_epoch_end) or at_batch_end)):
        return
    if at_batch_end and not epoch_loop._should_accumulate():
        epoch_loop._batches_that_stepped += 1  # what Lightning's restart adds for a checkpoint of a batch's end
    progress: Any = fit_loop.epoch_progress  # its trackers are _StartedTrackers, typed as their base
    progress.current.completed, progress.total.completed = progress.current.processed, progress.total.processed
    for loop in (fit_loop, epoch_loop, epoch_loop.val_loop):
        loop.reset_restart_stage()
    _Loop.restarting.fset(fit_loop, False)  # type: ignore[attr-defined]  # FitLoop's setter keeps it for max_steps
    if at_batch_end:
        _drop_train_loader(trainer)


class TrainData:
    """Remembers which ``stage_data`` the current training dataloader was built with, and has it built again when
    the data an epoch wants differs.

    Example::

        >>> tracker = TrainData()
        >>> tracker.built("all"); tracker.built_with
        'all'
    """

    def __init__(self) -> None:
        self.built_with: Any = _UNKNOWN
        # a step schedule: the optimizer step before which the running epoch must end (its data changes there)
        self.cut_at: float = math.inf

    def built(self, data: Optional[str]) -> None:
        """The loader Lightning builds next (or has just built) sees ``stage_data == data``."""
        self.built_with = data

    @staticmethod
    def refuse_empty(trainer: pl.Trainer, resolved: ResolvedStage) -> None:
        """Refuse a stage whose training loader, built again for it (its ``data`` changed), has no batches: Lightning
        would end the fit there without a word ("No training batches"), and this stage and every later one would
        never run.

        Raises:
            StageConfigError: naming the stage, ``data`` and its value.
        """
        if trainer.num_training_batches == 0:  # only a loader built during the fit gets here (Lightning stops before)
            raise StageConfigError(StageProblem(
                "gives a training dataloader with no batches (train_dataloader() with this stage_data), so the fit "
                "would end here and this stage and every later one would never run", index=resolved.index,
                name=resolved.name, field="data", value=resolved.data,
                hint="check what train_dataloader() returns for this stage_data"))

    def want(self, trainer: pl.Trainer, data: Optional[str]) -> bool:
        """Make the next epoch's loader one built with ``data``: if the current one was not, drop it so that the fit
        loop builds it again before the next epoch (after the caller has set ``stage_data``). Returns whether it does.
        """
        if self.built_with is _UNKNOWN or self.built_with == data:
            self.built_with = data
            return False
        _drop_train_loader(trainer)
        self.built_with = data
        return True


    def before_next_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, schedule: StageSchedule,
                          limit: Optional[int]) -> None:
        """At an epoch's end: Lightning builds the next epoch's loader before ``on_train_epoch_start``, so where the
        next epoch's ``data`` differs (a step schedule: the next optimizer step's), set it on the module as
        ``stage_data`` now and have the loader built again. ``limit``: the run's epochs (steps), ``None`` if open."""
        upcoming = trainer.global_step if schedule.unit == "step" else trainer.current_epoch + 1
        if (limit is None or upcoming < limit) and not trainer.should_stop:
            data = schedule.stage_at(upcoming).data
            if self.want(trainer, data):
                module: Any = pl_module  # a plain attribute
                module.stage_data = data

    def plan_cut(self, schedule: StageSchedule, resolved: ResolvedStage) -> None:
        """A step schedule: end the running epoch where ``resolved``'s range ends if the data after it differs and the
        run goes on (``schedule`` is the effective one, with the plateau transitions taken so far).

        Example::

            >>> s = StageSchedule([{"name": "kd", "start_step": 0, "end_step": 50, "data": "all"},
            ...                    {"name": "ft", "start_step": 50, "data": "labelled"}], total_steps=80)
            >>> data = TrainData(); data.plan_cut(s, s.stage_at(10)); data.cut_at
            50
            >>> data.plan_cut(s, s.stage_at(60)); data.cut_at  # ft runs to the run's end
            inf
        """
        end, total = resolved.end_epoch, schedule.total_steps
        inside = resolved.unit == "step" and end is not None and (total is None or end < total)  # not the run's end
        self.cut_at = end if inside and end is not None and schedule.stage_at(end).data != resolved.data else math.inf

    def cut_if_due(self, trainer: pl.Trainer) -> None:
        """Before a training batch: make it the epoch's last if its optimizer step reaches :attr:`cut_at` (automatic
        optimization, which steps where Lightning's accumulation says)."""
        loop = trainer.fit_loop.epoch_loop
        if (trainer.global_step + 1 >= self.cut_at and trainer.lightning_module.automatic_optimization
                and loop._accumulated_batches_reached()):
            loop.batch_progress.is_last_batch = True

    def cut_after_step(self, trainer: pl.Trainer) -> None:
        """After a training batch under manual optimization, which steps where the module says (every k batches,
        say): make it the epoch's last if its steps reached :attr:`cut_at`; no batch of the old data trains after it."""
        if trainer.global_step >= self.cut_at and not trainer.lightning_module.automatic_optimization:
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch = True

    def cut_now(self, trainer: pl.Trainer, schedule: StageSchedule) -> None:
        """After a validation that ended a step stage: if the next optimizer step trains on other data than the
        running loader, end the epoch here (with the epoch-interval LR schedulers stepped, as Lightning steps them
        after an epoch's last batch); the next batch is of the next epoch."""
        loop = trainer.fit_loop.epoch_loop
        if trainer.should_stop or loop._should_accumulate() or schedule.stage_at(trainer.global_step).data == self.built_with:
            return  # inside an accumulation the stage ends after this optimizer step: `cut_if_due` cuts there
        if not loop._num_ready_batches_reached():
            loop.batch_progress.is_last_batch = True
            loop.update_lr_schedulers("epoch", update_plateau_schedulers=False)


def _drop_train_loader(trainer: pl.Trainer) -> None:
    fit_loop = trainer.fit_loop
    fetcher = fit_loop._data_fetcher
    if fetcher is not None:  # shut the old loader's workers down now rather than at garbage collection
        fetcher.teardown()
        fit_loop._data_fetcher = None
    fit_loop._combined_loader = None
