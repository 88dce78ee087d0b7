"""``StageScheduleCallback``: applies the stage of the current epoch (or optimizer step) to the LightningModule."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_stages.adaptive_stages import AdaptiveStages, epoch_end_skipped
from lightning_stages.best_weights import best_weights_problem
from lightning_stages.checkpoint_guard import CheckpointGuard, warn_about_saved_schedule
from lightning_stages.distillation.distillation_module import DistillationModule
from lightning_stages.distillation.teachers import refuse_sharded_strategy
from lightning_stages.errors import StageConfigError, StageProblem, flag_problem
from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.bind import bind_schedule, declared_settings, given_schedule
from lightning_stages.schedule.render import format_stage_line, stage_metrics
from lightning_stages.schedule.stage import ResolvedStage, Stage
from lightning_stages.schedule.unit_checks import epoch_ramp_problems
from lightning_stages.stage_reports import add_stage_text, info, log_stage, report_cache, warn_about_coverage
from lightning_stages.train_data import TrainData, finish_resumed_epoch, resumed_epoch, step_data_problems

__all__ = ["StageScheduleCallback"]

log = logging.getLogger(__name__)

_DECLARED = "_ls_declared_base"


def _declared_base(pl_module: pl.LightningModule) -> dict[str, Any]:
    """What the module declared in ``__init__`` (remembered on first use, since the callback overwrites it)."""
    if _DECLARED not in pl_module.__dict__:
        pl_module.__dict__[_DECLARED] = declared_settings(getattr(pl_module, "loss_weights", None), getattr(
            pl_module, "use_distillation", None), getattr(pl_module, "lambda_coef", None))
    return pl_module.__dict__[_DECLARED]


def _max_epochs(trainer: pl.Trainer) -> Optional[int]:
    limit = None if getattr(trainer, "fast_dev_run", False) else trainer.max_epochs  # a smoke test, not a run length
    return limit if limit is not None and limit >= 0 else None


def _max_steps(trainer: pl.Trainer) -> Optional[int]:
    limit = None if getattr(trainer, "fast_dev_run", False) else trainer.max_steps  # (fast_dev_run: 1 epoch, N steps)
    return limit if limit is not None and limit >= 0 else None


def _position(trainer: pl.Trainer, schedule: StageSchedule) -> int:
    """Where training is, in the schedule's unit: the epoch, or the optimizer step (``trainer.global_step``)."""
    return trainer.global_step if schedule.unit == "step" else trainer.current_epoch


class StageScheduleCallback(CheckpointGuard):
    """Run training as consecutive stages, each with its own distillation switch, ``lambda_coef`` and loss weights.

    At the start of training and of every epoch, the stage of ``trainer.current_epoch`` is resolved (a pure
    function of the epoch) and applied to the LightningModule, which reads these attributes in its step. A schedule
    in optimizer steps is resolved from ``trainer.global_step`` and applied in ``on_train_batch_start`` where a stage
    begins; during a ramp, the ramped values are written before every training batch:

    * ``loss_weights``: the complete ``{task loss: weight}`` dict of the stage;
    * ``use_distillation``: whether the distillation loss is on;
    * ``lambda_coef``: the distillation coefficient;
    * ``stage_name``: the stage's name (``"base"`` where no stage covers the epoch);
    * ``stage_token``: an opaque value that differs between consecutive stages (even of the same name): the module's
      first-step checks run again when it changes. No checkpoint is written after a non-finite loss (the base,
      :class:`~lightning_stages.checkpoint_guard.CheckpointGuard`, also looks at every epoch end);
    * ``stage_data``: the stage's ``data`` (``None`` where it gives none). Where it changes from one epoch to the
      next, the training dataloader is built again, after the new stage is applied, so ``train_dataloader()`` (of
      the module or the datamodule) can read it; a resumed run builds the data of the stage it resumes in. In a step
      schedule, a change of ``data`` ends the running epoch at the boundary; the new stage starts a new epoch.

    The module declares its task losses as the keys of the ``loss_weights`` dict it sets in ``__init__``; those
    values are the base weights when none are given here. Without a schedule the base settings apply to every
    epoch, which is the plain single-stage training.

    Args:
        stage_schedule: the stages, as :class:`~lightning_stages.Stage` objects or plain mappings.
        config: path to a JSON or YAML config in the seed's format (``stage_schedule``, ``train.loss_weights``,
            ``train.epochs``, ``distillation.enable``, ``distillation.lambda_coef``). Not with ``stage_schedule``.
        loss_weights: base task-loss weights; override the module's declared ones key by key.
        distillation: base distillation flag; the module's ``use_distillation`` when not given, else off.
        lambda_coef: base distillation coefficient; the module's ``lambda_coef`` when not given, else 1.0.
        verbose: write one line per epoch with the stage in force (rank zero only).
        best_weights: where ``restore_best`` stages keep their best weights: ``"memory"`` (a CPU copy, also written
            into the checkpoints taken during the stage) or ``"file"`` (under the Trainer's log dir; checkpoints hold
            its path). See README "Adaptive stages" for the cost.

    Raises:
        StageConfigError: in ``__init__`` for problems of the schedule itself, in ``setup`` for problems that need
            the module or the Trainer (unknown loss keys, stages past ``max_epochs``, missing teachers): all before
            the first training batch (an epoch ramp's length: before its stage's first batch, against its loader).

    Example::

        >>> import lightning.pytorch as pl
        >>> callback = StageScheduleCallback(
        ...     stage_schedule=[
        ...         {"name": "distill_only", "start_epoch": 0, "end_epoch": 2, "distillation": True,
        ...          "loss_weights": {"bce": 0.0}},
        ...         {"name": "finetune_only", "start_epoch": 2, "distillation": False},
        ...     ], loss_weights={"bce": 1.0},
        ... )
        >>> trainer = pl.Trainer(max_epochs=4, callbacks=[callback], logger=False, enable_checkpointing=False)
    """

    def __init__(
        self,
        stage_schedule: Optional[list[Stage]] = None,
        config: Optional[str] = None,
        loss_weights: Optional[dict[str, float]] = None,
        distillation: Optional[bool] = None,
        lambda_coef: Optional[float] = None,
        verbose: bool = True,
        best_weights: str = "memory",
    ) -> None:
        if problem := (best_weights_problem(best_weights, "StageScheduleCallback")
                       or flag_problem(verbose, "verbose", "StageScheduleCallback")):
            raise StageConfigError(problem)
        # the base weights given here override the module's declared ones key by key: kept apart from the schedule
        schedule, self.base_loss_weights = given_schedule(stage_schedule, config, loss_weights, distillation,
                                                          lambda_coef)
        self.verbose = bool(verbose)
        # the state: the schedule as given, and as bound to the module and the Trainer at `setup`
        self.schedule = schedule
        self.resolved_schedule: Optional[StageSchedule] = None
        self._train_data = TrainData()
        # plateau-ended stages and restore_best: the transitions taken, the stage's tracker and best weights
        self.adaptive = AdaptiveStages(best_weights)
        self._resume_at: Optional[int] = None  # the epoch (or step) a resumed run trains next, from its checkpoint
        # never checkpointed: the step from which on_train_batch_start looks at the schedule again (inf: not in this
        # epoch; 0: every batch of an epoch ramp), the accumulation, the stages whose ramp was checked, the last logged step
        self._next_step: float = math.inf
        self._accumulate, self._ramps_checked, self._logged_step = 1, set[Optional[int]](), -1

    @property
    @override
    def state_key(self) -> str:
        return type(self).__qualname__

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._resume_at = None  # set again by on_load_checkpoint, which runs after setup
        max_epochs, max_steps = _max_epochs(trainer), _max_steps(trainer)
        schedule = bind_schedule(self.schedule, declared=_declared_base(pl_module),
                                 weight_overrides=self.base_loss_weights, max_epochs=max_epochs, max_steps=max_steps)
        self.resolved_schedule = schedule
        fitting = stage == "fit"
        needs_teachers = schedule.needs_teachers if fitting else schedule.base_distillation
        if needs_teachers:
            needed_by = schedule.first_distilling_label() or "base"
            if not isinstance(pl_module, DistillationModule):
                raise StageConfigError(StageProblem(
                    f"distillation is requested but {type(pl_module).__name__} is not a DistillationModule; write `class "
                    f"{type(pl_module).__name__}(DistillationModule, LightningModule)` and override configure_teachers()",
                    name=needed_by, field="distillation", value=True))
            refuse_sharded_strategy(trainer, needed_by)
            if not fitting:  # a fit builds them at on_fit_start, when it knows whether (and where) it resumes
                pl_module.prepare_teachers(needed_by=needed_by)
        if fitting:
            self.watch_afresh(trainer)  # no checkpoint after a non-finite loss (CheckpointGuard); each fit afresh
            warn_about_coverage(schedule, max_epochs if schedule.unit == "epoch" else max_steps)
            self._apply(pl_module, schedule, schedule.stage_at(_position(trainer, schedule)))  # ramps: at train start
        else:
            # validate / test / predict outside a fit run on the base settings
            self._apply(pl_module, schedule, schedule.base_stage())

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run applies its stage before the fit loop builds the train dataloader (which reads `stage_data`)
        self._teachers_from(pl_module, self._resume_at or _position(trainer, self._bound()))
        if self._resume_at is not None:
            schedule = self._effective()
            self._apply(pl_module, schedule, schedule.stage_at(self._resume_at))
            self._resume_at = None
        self._train_data.built(getattr(pl_module, "stage_data", None))

    def _teachers_from(self, pl_module: pl.LightningModule, at: int) -> None:  # only if a stage from `at` on distills
        if isinstance(pl_module, DistillationModule) and self._effective().distilling_until() > at:
            pl_module.prepare_teachers(needed_by=self._effective().first_distilling_label() or "base")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed within an epoch (its batches begun or done) gets no on_train_epoch_start for that epoch:
        # apply and report it here; otherwise on_train_epoch_start does. The stage's text goes to TensorBoard at the
        # first epoch of every run, as well as where a stage begins.
        skipped, effective = epoch_end_skipped(trainer), self._effective()  # skipped: before the restart flags reset
        at = _position(trainer, effective)  # resumed at an epoch's end: the next epoch starts (as if never stopped)
        finish_resumed_epoch(trainer, at > 0 and effective.stage_at(at - 1).data != effective.stage_at(at).data,
                             at_epoch_end=effective.unit == "step")
        self._teachers_from(pl_module, _position(trainer, self._bound()))  # the position the loops restored
        self._accumulate, self._ramps_checked = trainer.accumulate_grad_batches, set()
        if problems := step_data_problems(trainer, self._bound()):
            raise StageConfigError(problems)
        progress: Any = trainer.fit_loop.epoch_progress.current  # a _StartedTracker, typed as its base
        batches: Any = trainer.fit_loop.epoch_loop.batch_progress.current  # a _ProcessedTracker, likewise
        inside = progress.started > progress.completed  # resumed within an epoch: at its next batch (an epoch ramp)
        resolved = self._enter(trainer, pl_module, batches.processed if inside and self._bound().unit == "epoch" else 0)
        self.adaptive.start_fit(trainer, pl_module, self._bound(), _max_epochs(trainer), skipped)  # see there
        self._train_data.want(trainer, resolved.data)  # a loader built before the resumed epoch was known
        if inside or skipped:  # no on_train_epoch_start for this epoch (skipped: Lightning went on to the next)
            self._report(trainer, resolved)
        if inside or skipped or _position(trainer, self._bound()) != resolved.start_epoch:
            add_stage_text(trainer, resolved)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resolved = self._enter(trainer, pl_module, 0)
        self._train_data.refuse_empty(trainer, resolved)  # a stage's own data with no batches: not a silent end
        self._report(trainer, resolved)
        if _position(trainer, self._bound()) == resolved.start_epoch:
            add_stage_text(trainer, resolved)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step >= self._next_step:  # a boundary crossed or a ramp running (else one comparison)
            resolved = self._enter(trainer, pl_module, batch_idx)
            if self._bound().unit == "step" and trainer.global_step == resolved.start_epoch:  # a step stage begins
                self._report(trainer, resolved)
                add_stage_text(trainer, resolved)
            elif trainer.global_step != self._logged_step:  # once per optimizer step of a ramp, and where it ends
                self._log_metrics(trainer, resolved)
        if trainer.global_step + 1 >= self._train_data.cut_at:  # the data changes after this optimizer step
            self._train_data.cut_if_due(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # the non-finite watch
        self._train_data.cut_after_step(trainer)  # manual optimization: the batch whose step reached a change of data

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # no NaN-trained weights were scored: CheckpointGuard.on_validation_start stopped the run before
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and self.adaptive.after_validation(trainer, pl_module, self._bound()):  # a step stage ended here
            self._next_step = min(self._next_step, trainer.global_step)  # enter the next at the next batch
            self._train_data.cut_now(trainer, self._effective())  # its data differs: the epoch ends here

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cache = getattr(pl_module, "teacher_cache", None) if isinstance(pl_module, DistillationModule) else None
        if cache is not None:
            report_cache(trainer, cache.take_stats(), self.verbose)
        self.stop_if_nonfinite(trainer, pl_module, "at the end of the epoch", weights=True)  # before ModelCheckpoint
        max_epochs = _max_epochs(trainer)
        self.adaptive.at_epoch_end(trainer, pl_module, self._bound(), max_epochs)
        limit = max_epochs if self._bound().unit == "epoch" else _max_steps(trainer)
        self._train_data.before_next_epoch(trainer, pl_module, self._effective(), limit)  # where `data` changes

    def _bound(self) -> StageSchedule:
        if self.resolved_schedule is None:
            raise RuntimeError("StageScheduleCallback: `setup` binds the schedule before any epoch starts")
        return self.resolved_schedule

    def _effective(self) -> StageSchedule:
        """The bound schedule with the plateau transitions this run took (derived, never stored)."""
        return self.adaptive.effective(self._bound())

    def _enter(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> ResolvedStage:
        """Apply the values of this batch (a pure function of epoch and batch, or of the optimizer step) and keep the
        next step at which they can change; idempotent (the same batch applies the same values)."""
        schedule = self._effective()
        if schedule.unit == "step":
            resolved = schedule.at_step(trainer.global_step)
            if getattr(pl_module, "stage_token", None) != (resolved.index, resolved.start_epoch):  # named while in force
                self.stop_if_nonfinite(trainer, pl_module, "at the end of the stage", weights=True)
            self.adaptive.at_step(trainer, pl_module, self._bound())  # a restore_best stage ended: its best weights
            end = resolved.end_epoch if resolved.end_epoch is not None else math.inf  # ramping: every step
            self._next_step = trainer.global_step + 1 if resolved.ramping else end
            self._train_data.plan_cut(schedule, resolved)  # where the data changes, the epoch ends
        else:
            batches = trainer.num_training_batches  # this epoch's: a stage's own `data` may have another number
            if not batch_idx and (index := schedule.stage_at(trainer.current_epoch).index) not in self._ramps_checked:
                self._ramps_checked.add(index)  # a stage begins at batch 0: its ramp against its own loader, once
                if problems := epoch_ramp_problems(self._bound(), batches, self._accumulate, stages=[index]):
                    raise StageConfigError(problems)
            resolved = schedule.at(trainer.current_epoch, batch_idx, batches, accumulate_grad_batches=self._accumulate)
            self._next_step = 0 if resolved.ramping else math.inf  # an epoch ramp changes the values every batch
        self._apply(pl_module, schedule, resolved)
        return resolved

    @staticmethod
    def _apply(module: pl.LightningModule, schedule: StageSchedule, resolved: ResolvedStage) -> None:
        pl_module: Any = module  # plain attributes, not tensors or submodules
        pl_module.loss_weights = dict(resolved.loss_weights)
        pl_module.use_distillation = resolved.distillation
        pl_module.lambda_coef = resolved.lambda_coef
        pl_module.stage_name = resolved.name
        pl_module.stage_token = (resolved.index, resolved.start_epoch)
        pl_module.stage_data = resolved.data
        if isinstance(pl_module, DistillationModule):  # offload_teachers: does a current or later stage distill?
            later = resolved.end_epoch is not None and schedule.distilling_until() > resolved.end_epoch
            pl_module.update_teacher_placement(resolved.distillation, later)

    def _report(self, trainer: pl.Trainer, resolved: ResolvedStage) -> None:
        """The stage line and the ``stage/*`` scalars of the epoch (rank zero)."""
        if self.verbose and trainer.is_global_zero:
            info(format_stage_line(trainer.current_epoch, resolved))
        self._log_metrics(trainer, resolved)

    def _log_metrics(self, trainer: pl.Trainer, resolved: ResolvedStage) -> None:
        """The ``stage/*`` scalars at this optimizer step (rank zero)."""
        self._logged_step = trainer.global_step
        if trainer.is_global_zero:
            metrics = stage_metrics(resolved)
            for logger in trainer.loggers:
                log_stage(logger, metrics, resolved, trainer.global_step)  # with the stage's name where text goes

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        """``{"schedule": ..., "adaptive": ...}``: the schedule trained with (bound, if ``setup`` ran), which resume
        compares; the plateau transitions taken, the current stage's tracker and best weights, which resume follows."""
        return {"schedule": (self.resolved_schedule or self.schedule).to_dict(), "adaptive": self.adaptive.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn if the checkpoint's schedule differs from the one given now (which is the one resumed with).

        Checkpoints of 0.1 also hold ``epoch`` and ``stage``; they are ignored (the epoch's stage is resolved again).
        """
        current = self.resolved_schedule or self.schedule
        if isinstance(state_dict, Mapping) and "adaptive" in state_dict:
            self.adaptive.load_state_dict(state_dict["adaptive"], current)
        warn_about_saved_schedule(state_dict, current)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        self._resume_at = checkpoint.get("global_step") if self._bound().unit == "step" else resumed_epoch(checkpoint)
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            rank_zero_warn("StageScheduleCallback: the checkpoint was written without this callback; each epoch resumes "
                           "with the stage the schedule given now assigns to it.")
        elif not states[self.state_key]:  # an empty or zero state, which Lightning does not give load_state_dict
            warn_about_saved_schedule(states[self.state_key], self._bound())


