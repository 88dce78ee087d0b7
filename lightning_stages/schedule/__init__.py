"""The schedule wing: stages as data and pure functions of the epoch. Imports neither torch nor lightning."""

from lightning_stages.schedule.bind import bind_schedule
from lightning_stages.schedule.stage import BASE_STAGE_NAME, DEFAULT_LAMBDA_COEF, ResolvedStage, Stage
from lightning_stages.schedule.stage_schedule import StageSchedule

__all__ = ["BASE_STAGE_NAME", "DEFAULT_LAMBDA_COEF", "ResolvedStage", "Stage", "StageSchedule", "bind_schedule"]
