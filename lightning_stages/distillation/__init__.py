"""The distillation wing: teachers, feature hooks and step checks of the mixin. Knows nothing of schedules."""

from lightning_stages.distillation.distillation_module import STUDENT, DistillationModule
from lightning_stages.distillation.teacher_cache import IndexedDataset, TeacherCache
from lightning_stages.distillation.teacher_checkpoint import load_teacher_checkpoint

__all__ = ["STUDENT", "DistillationModule", "IndexedDataset", "TeacherCache", "load_teacher_checkpoint"]
