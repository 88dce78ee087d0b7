"""lightning-stages: multi-stage training with knowledge distillation for PyTorch Lightning."""

import logging as _logging

from lightning_stages import losses
from lightning_stages.distillation_module import DistillationModule
from lightning_stages.errors import StageConfigError, StageProblem
from lightning_stages.schedule import StageSchedule
from lightning_stages.stage import ResolvedStage, Stage
from lightning_stages.stage_schedule_callback import StageScheduleCallback

__version__ = "0.1.0"

__all__ = [
    "DistillationModule",
    "ResolvedStage",
    "Stage",
    "StageConfigError",
    "StageProblem",
    "StageSchedule",
    "StageScheduleCallback",
    "losses",
]

# like lightning.pytorch: show our INFO lines (the stage of each epoch) unless the application configured logging
_logger = _logging.getLogger(__name__)
_logger.setLevel(_logging.INFO)
if not _logging.getLogger().hasHandlers():
    _logger.addHandler(_logging.StreamHandler())
    _logger.propagate = False
