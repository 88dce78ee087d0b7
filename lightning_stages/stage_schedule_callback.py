"""``StageScheduleCallback``: applies the stage of the current epoch to the LightningModule."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_stages.distillation.distillation_module import DistillationModule
from lightning_stages.errors import StageConfigError, StageProblem, did_you_mean
from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.stage import ResolvedStage, Stage

__all__ = ["StageScheduleCallback"]

log = logging.getLogger(__name__)

_DECLARED = "_ls_declared_base"


def _declared_base(pl_module: pl.LightningModule) -> dict[str, Any]:
    """What the module declared in ``__init__`` (remembered on first use, since the callback overwrites it)."""
    declared = pl_module.__dict__.get(_DECLARED)
    if declared is None:
        weights = getattr(pl_module, "loss_weights", None)
        flag = getattr(pl_module, "use_distillation", None)
        coef = getattr(pl_module, "lambda_coef", None)
        declared = {
            "loss_weights": dict(weights) if isinstance(weights, Mapping) else None,
            "distillation": flag if isinstance(flag, bool) else None,
            "lambda_coef": coef if isinstance(coef, (int, float)) and not isinstance(coef, bool) else None,
        }
        pl_module.__dict__[_DECLARED] = declared
    return declared


def format_stage_line(epoch: int, resolved: ResolvedStage) -> str:
    """The one human-readable line logged at each epoch start.

    Example::

        >>> r = ResolvedStage("distill_only", 0, 1, 2, 0, 100, True, 1.0, {"bce": 0.0, "focal": 0.0})
        >>> format_stage_line(3, r)
        "epoch 3: stage 'distill_only' (1/2), use_distillation=True, lambda_coef=1.0, loss_weights: bce=0.0 focal=0.0"
    """
    position = f"{resolved.position}/{resolved.num_stages}" if not resolved.is_base else "no stage"
    weights = " ".join(f"{k}={v:g}" if v != int(v) else f"{k}={v}" for k, v in resolved.loss_weights.items())
    return (
        f"epoch {epoch}: stage {resolved.name!r} ({position}), use_distillation={resolved.distillation}, "
        f"lambda_coef={resolved.lambda_coef}, loss_weights: {weights or '(none)'}"
    )


def stage_metrics(resolved: ResolvedStage) -> dict[str, float]:
    """The ``stage/*`` scalars logged once per epoch.

    Example::

        >>> stage_metrics(ResolvedStage("a", 0, 1, 1, 0, None, True, 0.5, {"cls": 2.0}))
        {'stage/number': 1.0, 'stage/use_distillation': 1.0, 'stage/lambda_coef': 0.5, 'stage/weight_cls': 2.0}
    """
    metrics = {
        "stage/number": float(resolved.position or 0),
        "stage/use_distillation": float(resolved.distillation),
        "stage/lambda_coef": float(resolved.lambda_coef),
    }
    metrics.update({f"stage/weight_{k}": float(v) for k, v in resolved.loss_weights.items()})
    return metrics


class StageScheduleCallback(Callback):
    """Run training as consecutive stages, each with its own distillation switch, ``lambda_coef`` and loss weights.

    At the start of training and of every epoch, the stage of ``trainer.current_epoch`` is resolved (a pure
    function of the epoch) and applied to the LightningModule, which reads these attributes in its step:

    * ``loss_weights``: the complete ``{task loss: weight}`` dict of the stage;
    * ``use_distillation``: whether the distillation loss is on;
    * ``lambda_coef``: the distillation coefficient;
    * ``stage_name``: the stage's name (``"base"`` where no stage covers the epoch).

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
        if stage_schedule is not None and config is not None:
            raise StageConfigError(
                StageProblem("give either `stage_schedule` or `config`, not both", name="StageScheduleCallback",
                             field="config", value=str(config))
            )
        problems: list[StageProblem] = []
        total_epochs = None
        if config is not None:
            from_file = StageSchedule.from_config(os.fspath(config))
            stages = from_file.stages
            if from_file.loss_weights is not None or loss_weights is not None:
                loss_weights = {**(from_file.loss_weights or {}), **(loss_weights or {})}
            distillation = distillation if distillation is not None else from_file.distillation
            lambda_coef = lambda_coef if lambda_coef is not None else from_file.lambda_coef
            total_epochs = from_file.total_epochs
        else:
            if stage_schedule is not None and (
                isinstance(stage_schedule, (str, bytes, Mapping)) or not isinstance(stage_schedule, Sequence)
            ):
                raise StageConfigError(
                    StageProblem(f"must be a list of stages, not {type(stage_schedule).__name__}",
                                 name="StageScheduleCallback", field="stage_schedule", value=stage_schedule)
                )
            stages = tuple(stage_schedule or ())
        # the base weights given here override the module's declared ones key by key (checked against them in
        # setup), so the schedule is built without them and they are kept apart
        try:
            StageSchedule(loss_weights=loss_weights)
        except StageConfigError as err:
            problems += err.problems
        try:
            schedule = StageSchedule(
                stages=stages, distillation=distillation, lambda_coef=lambda_coef, total_epochs=total_epochs
            )
        except StageConfigError as err:
            problems += err.problems
        if problems:
            raise StageConfigError(problems)
        self.base_loss_weights: Optional[dict[str, float]] = dict(loss_weights) if loss_weights is not None else None
        self.schedule = schedule
        self.verbose = verbose
        self.resolved_schedule: Optional[StageSchedule] = None
        self.current: Optional[ResolvedStage] = None
        self._applied_epoch: Optional[int] = None
        self._reported_epoch: Optional[int] = None
        self._reported_stage: Optional[tuple[Optional[int], str]] = None
        self._distilling_until = 0.0  # exclusive end epoch of the last distilling range (inf: open-ended)

    @property
    @override
    def state_key(self) -> str:
        return type(self).__qualname__

    # ------------------------------------------------------------------ resolution against module and trainer

    def resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> StageSchedule:
        """The schedule with every base setting filled in from this callback, the module and the Trainer.

        Raises:
            StageConfigError: loss-weight keys the module does not have, stages that start at or after
                ``max_epochs``, or other problems, all together.
        """
        declared = _declared_base(pl_module)
        problems: list[StageProblem] = []
        base_weights = self.base_loss_weights
        if declared["loss_weights"] is not None:
            known = declared["loss_weights"]
            for key, value in (base_weights or {}).items():
                if key not in known:
                    problems.append(
                        StageProblem("is not a task loss of this module", name="base", field=f"loss_weights.{key}",
                                     value=value, hint=did_you_mean(key, list(known))
                                     or f"the module's task losses are: {', '.join(known) or '(none)'}")
                    )
            base_weights = {**known, **{k: v for k, v in (base_weights or {}).items() if k in known}}
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        try:
            resolved = StageSchedule(
                stages=self.schedule.stages,
                loss_weights=base_weights,
                distillation=self.schedule.distillation
                if self.schedule.distillation is not None
                else declared["distillation"],
                lambda_coef=self.schedule.lambda_coef
                if self.schedule.lambda_coef is not None
                else declared["lambda_coef"],
                total_epochs=self.schedule.total_epochs,
            )
        except StageConfigError as err:
            raise StageConfigError([*problems, *err.problems]) from None
        problems += resolved.missing_weight_problems()
        if max_epochs is not None:
            problems += resolved.epoch_problems(max_epochs)
        if problems:
            raise StageConfigError(problems)
        if resolved.total_epochs is None and max_epochs is not None:
            # stages without `end_epoch` end with the run
            resolved = resolved.with_base(total_epochs=max_epochs)
        return resolved

    def _first_distilling(self, schedule: StageSchedule) -> str:
        """The first stage (by start epoch) that needs teachers, as named in error messages."""
        if schedule.base_distillation:
            return "base (distillation.enable)"
        by_start = sorted(range(len(schedule.stages)), key=lambda i: schedule.stages[i].start_epoch)
        index = next(i for i in by_start if schedule.stages[i].distillation)
        return f"stage {index} ({schedule.stages[index].name or f'stage_{index}'!r})"

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        schedule = self.resolve(trainer, pl_module)
        self.resolved_schedule = schedule
        self._distilling_until = _distilling_until(schedule)
        fitting = stage == "fit"
        needs_teachers = schedule.needs_teachers if fitting else schedule.base_distillation
        if needs_teachers:
            needed_by = self._first_distilling(schedule)
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
            self._reported_epoch = self._reported_stage = None
            self._warn_about_coverage(trainer, schedule)
            self._apply(pl_module, schedule.at(trainer.current_epoch))
        else:
            # validate / test / predict outside a fit run on the base settings
            self._apply(pl_module, _base_of(schedule))
        self._applied_epoch = None

    def _warn_about_coverage(self, trainer: pl.Trainer, schedule: StageSchedule) -> None:
        gaps = schedule.uncovered_ranges()
        if gaps:
            ranges = ", ".join(f"[{a}, {b if b is not None else 'end'})" for a, b in gaps)
            rank_zero_warn(
                f"StageScheduleCallback: no stage covers epochs {ranges}; they run with the base settings "
                f"(distillation={schedule.base_distillation}, lambda_coef={schedule.base_lambda_coef}, "
                f"loss_weights={schedule.base_loss_weights})."
            )
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            for index, stage in enumerate(schedule.stages):
                end = schedule.end_of(stage)
                if end is not None and end > max_epochs and stage.start_epoch < max_epochs:
                    rank_zero_warn(
                        f"StageScheduleCallback: stage {index} ({stage.name or f'stage_{index}'!r}) ends at epoch "
                        f"{end} but the Trainer stops at max_epochs={max_epochs}; it is cut short."
                    )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run resumed mid-epoch does not call on_train_epoch_start for that epoch
        self._enter_epoch(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_epoch(trainer, pl_module)

    def _enter_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ResolvedStage:
        schedule = self.resolved_schedule
        if schedule is None:  # pragma: no cover - setup always runs first
            schedule = self.resolved_schedule = self.resolve(trainer, pl_module)
        epoch = trainer.current_epoch
        resolved = schedule.at(epoch)
        self._apply(pl_module, resolved)
        self._applied_epoch = epoch
        if self._reported_epoch != epoch:
            self._reported_epoch = epoch
            self._report(trainer, epoch, resolved)
        return resolved

    def _apply(self, pl_module: pl.LightningModule, resolved: ResolvedStage) -> None:
        self.current = resolved
        pl_module.loss_weights = dict(resolved.loss_weights)
        pl_module.use_distillation = resolved.distillation
        pl_module.lambda_coef = resolved.lambda_coef
        pl_module.stage_name = resolved.name
        if isinstance(pl_module, DistillationModule):  # offload_teachers: does a current or later stage distill?
            later = resolved.end_epoch is not None and self._distilling_until > resolved.end_epoch
            pl_module.update_teacher_placement(resolved.distillation, later)

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ResolvedStage:
        """Resolve and apply the stage of ``trainer.current_epoch``. Idempotent; returns the stage applied."""
        return self._enter_epoch(trainer, pl_module)

    def _report(self, trainer: pl.Trainer, epoch: int, resolved: ResolvedStage) -> None:
        if not trainer.is_global_zero:
            return
        if self.verbose:
            _info(format_stage_line(epoch, resolved))
        metrics = stage_metrics(resolved)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        key = (resolved.index, resolved.name)
        if key != self._reported_stage:
            self._reported_stage = key
            text = format_stage_line(epoch, resolved)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("stage", text, global_step=trainer.global_step)

    # ------------------------------------------------------------------ checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        schedule = self.resolved_schedule or self.schedule
        return {
            "schedule": schedule.to_dict(),
            "epoch": self._applied_epoch,
            "stage": None if self.current is None else self.current.name,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            rank_zero_warn(
                "StageScheduleCallback: the checkpoint was written without this callback; each epoch resumes with "
                "the stage the schedule given now assigns to it."
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


def _distilling_until(schedule: StageSchedule) -> float:
    """The exclusive end epoch of the schedule's last distilling range: ``inf`` if open-ended, 0 if none."""
    until = 0.0
    for resolved in schedule.timeline():
        if resolved.distillation:
            until = float("inf") if resolved.end_epoch is None else max(until, float(resolved.end_epoch))
    return until


def _base_of(schedule: StageSchedule) -> ResolvedStage:
    return ResolvedStage(
        name="base", index=None, position=None, num_stages=len(schedule.stages), start_epoch=0, end_epoch=None,
        distillation=schedule.base_distillation, lambda_coef=schedule.base_lambda_coef,
        loss_weights=schedule.base_loss_weights,
    )


@rank_zero_only
def _info(message: str) -> None:
    log.info(message)
