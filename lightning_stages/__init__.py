"""lightning-stages: multi-stage training with knowledge distillation for PyTorch Lightning."""

import logging as _logging

from lightning_stages import losses
from lightning_stages.distillation.distillation_module import DistillationModule
from lightning_stages.distillation.teacher_cache import IndexedDataset, TeacherCache
from lightning_stages.distillation.teacher_checkpoint import load_teacher_checkpoint
from lightning_stages.errors import DistillationStepError, StageConfigError, StageProblem
from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.stage import ResolvedStage, Stage
from lightning_stages.stage_schedule_callback import StageScheduleCallback

__version__ = "0.1.0"

__all__ = [
    "DistillationModule",
    "DistillationStepError",
    "IndexedDataset",
    "ResolvedStage",
    "Stage",
    "StageConfigError",
    "StageProblem",
    "StageSchedule",
    "StageScheduleCallback",
    "TeacherCache",
    "load_teacher_checkpoint",
    "losses",
]

# like lightning.pytorch: show our INFO lines (the stage of each epoch) unless the application configured logging
_logger = _logging.getLogger(__name__)
_logger.setLevel(_logging.INFO)
if not _logging.getLogger().hasHandlers():
    _logger.addHandler(_logging.StreamHandler())
    _logger.propagate = False
