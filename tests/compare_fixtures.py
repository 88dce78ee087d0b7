"""Tiny configs and a tiny teacher for the tests of ``compare`` (shared by its runner and Ray tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import yaml

from examples.segmentation import SegmentationTeacher, ShapesDataModule

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = {"num_train": 16, "num_val": 8, "num_test": 8, "image_size": 16, "batch_size": 8, "data_seed": 0}
TINY_TEACHER = {"widths": [4, 8, 16], "convs_per_block": 1}
TINY_STUDENT = {"widths": [2, 4, 8], "convs_per_block": 1}


def make_tiny_teacher(path: Path) -> Path:
    """A real (tiny) teacher checkpoint, written by a Trainer."""
    model = SegmentationTeacher(**TINY_TEACHER)
    trainer = pl.Trainer(max_steps=1, enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, logger=False)
    trainer.fit(model, datamodule=ShapesDataModule(**TINY_DATA))
    trainer.save_checkpoint(path)
    return path


def tiny_config(path: Path, teacher: Optional[Path], stages: Optional[list[dict[str, Any]]] = None,
                max_epochs: int = 2, lr: float = 0.003) -> Path:
    """``configs/segmentation_joint.yaml`` shrunk to tiny data, models and epochs, with the given stages."""
    config = yaml.safe_load((ROOT / "configs" / "segmentation_joint.yaml").read_text())
    config["trainer"].update(max_epochs=max_epochs, logger=False, enable_checkpointing=False)
    config["data"]["init_args"] = dict(TINY_DATA)
    config["model"]["init_args"].update(TINY_STUDENT, lr=lr, teacher_channels=TINY_TEACHER["widths"][-1],
                                        teacher_checkpoint=str(teacher or path.parent / "missing.ckpt"))
    config["trainer"]["callbacks"] = [] if stages is None else [
        {"class_path": "lightning_stages.StageScheduleCallback", "init_args": {"stage_schedule": stages}}]
    path.write_text(yaml.safe_dump(config))
    return path
