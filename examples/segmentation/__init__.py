"""Binary segmentation plus classification of procedural shapes: does distilling first, last, or throughout win?

Run from the repository root::

    python -m examples.segmentation demo                      # teacher, then compare the four schedules
    python -m examples.segmentation fit --config configs/segmentation_teacher.yaml
    python -m examples.segmentation fit --config configs/segmentation_distill_finetune.yaml
"""

from examples.segmentation.data import (
    CLASSES,
    TRAIN_DATA,
    ShapesDataModule,
    labelled_indices,
    labelled_train_split,
    make_sample,
    make_split,
)
from examples.segmentation.models import SegNet, count_parameters
from examples.segmentation.module import (
    DEFAULT_LOSS_WEIGHTS,
    TEACHER_CHECKPOINT,
    TEACHER_COMMAND,
    SegmentationStudent,
    SegmentationTask,
    SegmentationTeacher,
    labelled_task_losses,
    task_losses,
)

__all__ = [
    "CLASSES",
    "DEFAULT_LOSS_WEIGHTS",
    "TEACHER_CHECKPOINT",
    "TEACHER_COMMAND",
    "TRAIN_DATA",
    "SegNet",
    "SegmentationStudent",
    "SegmentationTask",
    "SegmentationTeacher",
    "ShapesDataModule",
    "count_parameters",
    "labelled_indices",
    "labelled_task_losses",
    "labelled_train_split",
    "make_sample",
    "make_split",
    "task_losses",
]
