"""``StageScheduleCallback``: applies the stage of the current epoch to the LightningModule."""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_stages.distillation.distillation_module import DistillationModule
from lightning_stages.errors import StageConfigError, StageProblem
from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.bind import bind_schedule, declared_settings, given_schedule
from lightning_stages.schedule.render import format_stage_line, stage_metrics
from lightning_stages.schedule.stage import ResolvedStage, Stage
from lightning_stages.train_data import TrainData, resumed_epoch

__all__ = ["StageScheduleCallback"]

log = logging.getLogger(__name__)

_DECLARED = "_ls_declared_base"


def _declared_base(pl_module: pl.LightningModule) -> dict[str, Any]:
    """What the module declared in ``__init__`` (remembered on first use, since the callback overwrites it)."""
    declared = pl_module.__dict__.get(_DECLARED)
    if declared is None:
        declared = declared_settings(getattr(pl_module, "loss_weights", None),
                                     getattr(pl_module, "use_distillation", None),
                                     getattr(pl_module, "lambda_coef", None))
        pl_module.__dict__[_DECLARED] = declared
    return declared


def _max_epochs(trainer: pl.Trainer) -> Optional[int]:
    return trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None


class StageScheduleCallback(Callback):
    """Run training as consecutive stages, each with its own distillation switch, ``lambda_coef`` and loss weights.

    At the start of training and of every epoch, the stage of ``trainer.current_epoch`` is resolved (a pure
    function of the epoch) and applied to the LightningModule, which reads these attributes in its step:

    * ``loss_weights``: the complete ``{task loss: weight}`` dict of the stage;
    * ``use_distillation``: whether the distillation loss is on;
    * ``lambda_coef``: the distillation coefficient;
    * ``stage_name``: the stage's name (``"base"`` where no stage covers the epoch);
    * ``stage_data``: the stage's ``data`` (``None`` where it gives none). Where it changes from one epoch to the
      next, the training dataloader is built again, after the new stage is applied, so ``train_dataloader()`` (of
      the module or the datamodule) can read it; a resumed run builds the data of the stage it resumes in.

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

    Raises:
        StageConfigError: in ``__init__`` for problems of the schedule itself, in ``setup`` for problems that need
            the module or the Trainer (unknown loss keys, stages past ``max_epochs``, missing teachers). All before
            the first training batch.

    Example::

        >>> import lightning.pytorch as pl
        >>> callback = StageScheduleCallback(
        ...     stage_schedule=[
        ...         {"name": "distill_only", "start_epoch": 0, "end_epoch": 2, "distillation": True,
        ...          "loss_weights": {"bce": 0.0}},
        ...         {"name": "finetune_only", "start_epoch": 2, "distillation": False},
        ...     ],
        ...     loss_weights={"bce": 1.0},
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
    ) -> None:
        # the base weights given here override the module's declared ones key by key (checked against them in
        # setup), so they are kept apart from the schedule
        schedule, self.base_loss_weights = given_schedule(stage_schedule, config, loss_weights, distillation,
                                                          lambda_coef)
        self.verbose = verbose
        # the state: the schedule as given, and as bound to the module and the Trainer at `setup`
        self.schedule = schedule
        self.resolved_schedule: Optional[StageSchedule] = None
        self._train_data = TrainData()
        self._resume_epoch: Optional[int] = None  # the epoch a resumed run trains next, read from its checkpoint

    @property
    @override
    def state_key(self) -> str:
        return type(self).__qualname__

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._resume_epoch = None  # set again by on_load_checkpoint, which runs after setup
        max_epochs = _max_epochs(trainer)
        schedule = bind_schedule(self.schedule, declared=_declared_base(pl_module),
                                 weight_overrides=self.base_loss_weights, max_epochs=max_epochs)
        self.resolved_schedule = schedule
        fitting = stage == "fit"
        needs_teachers = schedule.needs_teachers if fitting else schedule.base_distillation
        if needs_teachers:
            needed_by = schedule.first_distilling_label() or "base"
            if not isinstance(pl_module, DistillationModule):
                raise StageConfigError(
                    StageProblem(
                        f"distillation is requested but {type(pl_module).__name__} is not a DistillationModule; "
                        f"write `class {type(pl_module).__name__}(DistillationModule, LightningModule)` and "
                        "override configure_teachers()",
                        name=needed_by, field="distillation", value=True,
                    )
                )
            _refuse_sharded_strategy(trainer, needed_by)
            pl_module.prepare_teachers(needed_by=needed_by)
        if fitting:
            _warn_about_coverage(schedule, max_epochs)
            self._apply(pl_module, schedule, schedule.at(trainer.current_epoch))
        else:
            # validate / test / predict outside a fit run on the base settings
            self._apply(pl_module, schedule, schedule.base_stage())

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the fit loop builds the training dataloader right after this (before on_train_start): a resumed run applies
        # the stage it resumes in now, so that `train_dataloader()` sees that stage's `stage_data`
        if self._resume_epoch is not None:
            self._enter_epoch(pl_module, self._resume_epoch)
            self._resume_epoch = None
        self._train_data.built(getattr(pl_module, "stage_data", None))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed within an epoch (its batches begun or done) gets no on_train_epoch_start for that epoch:
        # apply and report it here; otherwise on_train_epoch_start does. The stage's text goes to TensorBoard at the
        # first epoch of every run, as well as where a stage begins.
        resolved = self._enter_epoch(pl_module, trainer.current_epoch)
        self._train_data.want(trainer, resolved.data)  # a loader built before the resumed epoch was known
        progress: Any = trainer.fit_loop.epoch_progress.current  # a _StartedTracker, typed as its base
        if progress.started > progress.completed:
            self._report(trainer, resolved)
        if progress.started > progress.completed or trainer.current_epoch != resolved.start_epoch:
            _add_stage_text(trainer, resolved)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resolved = self._enter_epoch(pl_module, trainer.current_epoch)
        self._report(trainer, resolved)
        if trainer.current_epoch == resolved.start_epoch:
            _add_stage_text(trainer, resolved)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning builds the next epoch's loader before on_train_epoch_start: where the next epoch's `data` differs,
        # apply the next stage's data now and have the loader built again
        max_epochs = _max_epochs(trainer)
        upcoming = trainer.current_epoch + 1
        if max_epochs is None or upcoming < max_epochs:
            resolved = self._bound().at(upcoming)
            if self._train_data.want(trainer, resolved.data):
                module: Any = pl_module
                module.stage_data = resolved.data

    def _bound(self) -> StageSchedule:
        if self.resolved_schedule is None:
            raise RuntimeError("StageScheduleCallback: `setup` binds the schedule before any epoch starts")
        return self.resolved_schedule

    def _enter_epoch(self, pl_module: pl.LightningModule, epoch: int) -> ResolvedStage:
        """Apply the stage of ``epoch``; idempotent (the same epoch applies the same values)."""
        schedule = self._bound()
        resolved = schedule.at(epoch)
        self._apply(pl_module, schedule, resolved)
        return resolved

    @staticmethod
    def _apply(module: pl.LightningModule, schedule: StageSchedule, resolved: ResolvedStage) -> None:
        pl_module: Any = module  # plain attributes, not tensors or submodules
        pl_module.loss_weights = dict(resolved.loss_weights)
        pl_module.use_distillation = resolved.distillation
        pl_module.lambda_coef = resolved.lambda_coef
        pl_module.stage_name = resolved.name
        pl_module.stage_data = resolved.data
        if isinstance(pl_module, DistillationModule):  # offload_teachers: does a current or later stage distill?
            later = resolved.end_epoch is not None and schedule.distilling_until() > resolved.end_epoch
            pl_module.update_teacher_placement(resolved.distillation, later)

    def _report(self, trainer: pl.Trainer, resolved: ResolvedStage) -> None:
        """The stage line and the ``stage/*`` scalars of the epoch (rank zero)."""
        if not trainer.is_global_zero:
            return
        if self.verbose:
            _info(format_stage_line(trainer.current_epoch, resolved))
        metrics = stage_metrics(resolved)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        """``{"schedule": ...}``: the schedule trained with (bound, if ``setup`` ran), which resume compares."""
        return {"schedule": (self.resolved_schedule or self.schedule).to_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn if the checkpoint's schedule differs from the one given now (which is the one resumed with).

        Checkpoints of 0.1 also hold ``epoch`` and ``stage``; they are ignored (the epoch's stage is resolved again).
        """
        current = self.resolved_schedule or self.schedule
        try:
            saved = StageSchedule.from_config(state_dict.get("schedule", {}))
        except StageConfigError as err:
            rank_zero_warn(f"StageScheduleCallback: the schedule saved in the checkpoint could not be read ({err}); "
                           "resuming with the schedule given now.")
            return
        changes = saved.diff(current)
        if changes:
            rank_zero_warn(
                "StageScheduleCallback: the schedule differs from the one in the checkpoint; resuming with the one "
                "given now. Changes (checkpoint -> now): " + "; ".join(changes)
            )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resume_epoch = resumed_epoch(checkpoint)
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            rank_zero_warn(
                "StageScheduleCallback: the checkpoint was written without this callback; each epoch resumes with "
                "the stage the schedule given now assigns to it."
            )


def _add_stage_text(trainer: pl.Trainer, resolved: ResolvedStage) -> None:
    """The stage line as TensorBoard text (rank zero)."""
    if trainer.is_global_zero:
        text = format_stage_line(trainer.current_epoch, resolved)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("stage", text, global_step=trainer.global_step)


def _warn_about_coverage(schedule: StageSchedule, max_epochs: Optional[int]) -> None:
    gaps = schedule.uncovered_ranges()
    if gaps:
        ranges = ", ".join(f"[{a}, {b if b is not None else 'end'})" for a, b in gaps)
        rank_zero_warn(
            f"StageScheduleCallback: no stage covers epochs {ranges}; they run with the base settings "
            f"(distillation={schedule.base_distillation}, lambda_coef={schedule.base_lambda_coef}, "
            f"loss_weights={schedule.base_loss_weights})."
        )
    if max_epochs is not None:
        for index, name, end in schedule.cut_short(max_epochs):
            rank_zero_warn(
                f"StageScheduleCallback: stage {index} ({name!r}) ends at epoch {end} but the Trainer stops at "
                f"max_epochs={max_epochs}; it is cut short."
            )


def _refuse_sharded_strategy(trainer: pl.Trainer, needed_by: str) -> None:
    """Teachers live outside the module that FSDP, DeepSpeed and ModelParallel shard; refuse them there, at setup."""
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise StageConfigError(
            StageProblem(
                f"distillation is not supported under {type(strategy).__name__}: the teachers are kept outside the "
                "module this strategy shards, so every rank would hold a whole, unsharded copy that the strategy "
                "neither shards nor places on the device",
                name=needed_by, field="distillation", value=True,
                hint="use strategy='ddp' (or 'ddp_spawn'), or a schedule whose stages do not distill",
            )
        )


@rank_zero_only
def _info(message: str) -> None:
    log.info(message)
