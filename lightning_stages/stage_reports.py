"""What the stage callback tells the user: the stage's TensorBoard text, the teacher cache's counts per epoch, the
warnings about uncovered and cut-short ranges, and the per-epoch log line."""

from __future__ import annotations

import logging
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.bind import run_of
from lightning_stages.schedule.render import format_stage_line
from lightning_stages.schedule.stage import ResolvedStage

__all__ = ["add_stage_text", "info", "log_stage", "report_cache", "warn_about_coverage"]

log = logging.getLogger("lightning_stages.stage_schedule_callback")  # the logger users configure for the stage line


def add_stage_text(trainer: pl.Trainer, resolved: ResolvedStage) -> None:
    """The stage line as TensorBoard text (rank zero)."""
    if trainer.is_global_zero:
        text = format_stage_line(trainer.current_epoch, resolved)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("stage", text, global_step=trainer.global_step)


def log_stage(logger: Logger, metrics: dict[str, float], resolved: ResolvedStage, step: int) -> None:
    """The ``stage/*`` scalars, and the stage's name where the logger takes text: a ``stage/name`` column of the
    ``CSVLogger`` (in the same row), run tags of the ``MLFlowLogger`` (``stage/name``, the stage in force, and
    ``stage/<number>``; MLflow drops text metrics and refuses a changed param)."""
    if isinstance(logger, CSVLogger):
        logger.log_metrics({**metrics, "stage/name": resolved.name}, step=step)  # type: ignore[dict-item]
        return
    logger.log_metrics(metrics, step=step)
    if isinstance(logger, MLFlowLogger):
        logger.experiment.set_tag(logger.run_id, "stage/name", resolved.name)
        logger.experiment.set_tag(logger.run_id, f"stage/{resolved.position or 0}", resolved.label)


def report_cache(trainer: pl.Trainer, stats: dict[str, int], verbose: bool) -> None:
    """The teacher cache's hits, misses and input mismatches of the epoch, summed over the ranks, as
    ``teacher_cache/*`` scalars (and a log line when verbose). Every rank calls it: the sum is a collective."""
    keys = sorted(stats)
    totals = trainer.strategy.reduce(torch.tensor([float(stats[k]) for k in keys]), reduce_op="sum")
    summed = {f"teacher_cache/{k}": float(v) for k, v in zip(keys, torch.as_tensor(totals).tolist())}
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(summed, step=trainer.global_step)
    if verbose:
        info(f"epoch {trainer.current_epoch}: teacher cache " + ", ".join(
            f"{k.split('/')[1]}={int(v)}" for k, v in summed.items()))


def warn_about_coverage(schedule: StageSchedule, max_epochs: Optional[int]) -> None:
    unit = schedule.unit
    # as the run trains it: a schedule file's open stages end at its own length, which the run may outlast
    gaps = run_of(schedule, max_epochs, max_epochs).uncovered_ranges()
    if gaps:
        ranges = ", ".join(f"[{a}, {b if b is not None else 'end'})" for a, b in gaps)
        rank_zero_warn(
            f"StageScheduleCallback: no stage covers {unit}s {ranges}; they run with the base settings "
            f"(distillation={schedule.base_distillation}, lambda_coef={schedule.base_lambda_coef}, "
            f"loss_weights={schedule.base_loss_weights})."
        )
    if max_epochs is not None:
        for index, name, end in schedule.cut_short(max_epochs):
            rank_zero_warn(
                f"StageScheduleCallback: stage {index} ({name!r}) ends at {unit} {end} but the Trainer stops at "
                f"max_{unit}s={max_epochs}; it is cut short."
            )


@rank_zero_only
def info(message: str) -> None:
    log.info(message)
