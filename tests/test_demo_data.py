"""The demo's scarce labels: a fixed, seeded labelled subset; task losses on labelled images only, distillation on
all; a finetune stage (``data: labelled``) trains on the labelled images alone, a distilling stage (``data: all``) on
every image."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_DATA, TINY_TEACHER, trainer

import examples.segmentation.module as segmentation_module
from examples.segmentation import (
    SegmentationStudent,
    ShapesDataModule,
    labelled_indices,
    labelled_task_losses,
    make_split,
)
from lightning_stages import StageConfigError, StageScheduleCallback

FRACTION = 0.25  # 8 of TINY_DATA's 32 training images
TASK_WEIGHTS = {"bce": 1.0, "focal": 1.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}
SCHEDULE = [
    {"name": "joint", "start_epoch": 0, "end_epoch": 1, "distillation": True, "data": "all"},
    {"name": "finetune", "start_epoch": 1, "end_epoch": 2, "distillation": False, "data": "labelled"},
]


def student(teacher: Path) -> SegmentationStudent:
    return SegmentationStudent(widths=(2, 4, 8), convs_per_block=1, loss_weights=TASK_WEIGHTS,
                               teacher_checkpoint=str(teacher), teacher_channels=TINY_TEACHER["widths"][-1])


def data(**kwargs: float) -> ShapesDataModule:
    return ShapesDataModule(**{**TINY_DATA, "batch_size": 5, "labelled_fraction": FRACTION, **kwargs})


def row_keys(images: torch.Tensor) -> list[bytes]:
    """One hashable key per image, to tell which images a batch holds."""
    return [image.numpy().tobytes() for image in images]


def test_the_labelled_subset_is_fixed_by_the_data_seed_and_hides_the_other_labels() -> None:
    first, again, other = data().train_dataset("all"), data().train_dataset("all"), data(data_seed=1).train_dataset()
    images, masks, classes = make_split(0, "train", TINY_DATA["num_train"], TINY_DATA["image_size"])
    flags = first.tensors[3]
    assert int(flags.sum()) == round(FRACTION * TINY_DATA["num_train"]) == 8
    assert torch.equal(flags, again.tensors[3])  # another instance: the same subset
    assert not torch.equal(other.tensors[3], torch.zeros_like(flags)) and not torch.equal(other.tensors[3], flags)
    # the labelled rows keep their true mask and class; the others' are hidden
    assert torch.equal(first.tensors[0], images)
    assert torch.equal(first.tensors[1][flags], masks[flags]) and torch.equal(first.tensors[2][flags], classes[flags])
    assert float(first.tensors[1][~flags].sum()) == 0.0 and set(first.tensors[2][~flags].tolist()) == {-1}
    assert float(masks[~flags].sum()) > 0  # hiding changed the shared split in no way
    assert torch.equal(torch.nonzero(flags)[:, 0], labelled_indices(0, TINY_DATA["num_train"], FRACTION))


def test_task_losses_see_only_labelled_images_and_distillation_sees_all(
    tmp_path: Path, teacher_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_by_task: Counter[int] = Counter()  # epoch -> images the task losses saw
    seen_by_distillation: Counter[int] = Counter()
    trained_on: dict[int, list[bytes]] = {}
    model = student(teacher_ckpt)
    task_losses, distillation_losses = segmentation_module.task_losses, model.distillation_losses

    def counting_task_losses(out, mask, label):
        assert (label >= 0).all()  # a hidden label never reaches a task loss
        seen_by_task[model.trainer.current_epoch] += int(label.shape[0])
        return task_losses(out, mask, label)

    def counting_distillation_losses(x, out):
        losses = distillation_losses(x, out)
        if losses:
            seen_by_distillation[model.trainer.current_epoch] += int(x.shape[0])
        return losses

    def record_batch(batch, batch_idx):
        trained_on.setdefault(model.trainer.current_epoch, []).extend(row_keys(batch[0]))

    monkeypatch.setattr(segmentation_module, "task_losses", counting_task_losses)
    monkeypatch.setattr(model, "distillation_losses", counting_distillation_losses)
    monkeypatch.setattr(model, "on_train_batch_start", record_batch)
    datamodule = data()
    trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(SCHEDULE, verbose=False)],
            limit_val_batches=0).fit(model, datamodule=datamodule)

    images = make_split(0, "train", TINY_DATA["num_train"], TINY_DATA["image_size"])[0]
    labelled = labelled_indices(0, TINY_DATA["num_train"], FRACTION)
    # epoch 0 (`data: all`): every image trains and is distilled; the task losses see the 8 labelled ones
    assert sorted(trained_on[0]) == sorted(row_keys(images))
    assert seen_by_distillation[0] == 32 and seen_by_task[0] == 8
    # epoch 1 (`data: labelled`): the loader holds exactly the labelled images; no distillation
    assert sorted(trained_on[1]) == sorted(row_keys(images[labelled]))
    assert seen_by_distillation[1] == 0 and seen_by_task[1] == 8


def test_a_batch_without_labels_gives_zero_task_losses_that_backpropagate() -> None:
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    out = {"mask": logits, "iou": torch.sigmoid(logits.mean((1, 2, 3))), "cls": logits.flatten(1)[:, :5]}
    losses = labelled_task_losses(out, torch.zeros(2, 1, 4, 4), torch.tensor([-1, -1]), torch.tensor([False, False]))
    assert sorted(losses) == ["bce", "cls", "dice", "focal", "iou"] and all(v.item() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_an_unknown_data_value_fails_before_training_naming_stage_field_and_value(
    tmp_path: Path, teacher_ckpt: Path
) -> None:
    schedule = [dict(SCHEDULE[0]), {**SCHEDULE[1], "data": "labeled"}]
    fit = trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(schedule, verbose=False)])
    with pytest.raises(StageConfigError, match=r"stage 1 \('finetune'\): `data` = 'labeled': .*did you mean "
                                               r"`labelled`\?"):
        fit.fit(student(teacher_ckpt), datamodule=data())
    assert fit.global_step == 0


@pytest.mark.parametrize("fraction", [0, 1.5, -0.1, True])
def test_labelled_fraction_outside_zero_one_is_an_error(fraction: float) -> None:
    with pytest.raises(ValueError, match=rf"`labelled_fraction` to be in \(0, 1\] but got {fraction!r}"):
        data(labelled_fraction=fraction)


@pytest.mark.parametrize("fraction", [np.float32(0.25), np.int64(1)])
def test_a_numpy_labelled_fraction_in_range_is_accepted(fraction: float) -> None:
    module = data(labelled_fraction=fraction)
    assert module.num_labelled == {0.25: 8, 1: 32}[float(fraction)]  # of 32 images
    assert type(module.hparams.labelled_fraction) is float  # a checkpoint's hyper-parameters load with weights_only


def test_the_full_label_demo_compares_the_same_schedules_with_every_label(tmp_path: Path) -> None:
    from examples.segmentation.__main__ import SCHEDULE_CONFIGS, with_labelled_fraction
    from lightning_stages.cli.lightning_config import schedule_of_config

    written = with_labelled_fraction(SCHEDULE_CONFIGS, 1.0, tmp_path)
    assert [p.name for p in written] == [p.name for p in SCHEDULE_CONFIGS]  # the schedules keep their names
    for original, copy in zip(SCHEDULE_CONFIGS, written):
        assert yaml.safe_load(copy.read_text())["data"]["init_args"]["labelled_fraction"] == 1.0
        assert schedule_of_config(copy).timeline() == schedule_of_config(original).timeline()


@pytest.mark.parametrize("option", ["--seeds", "--jobs"])
def test_demo_rejects_fewer_than_one_seed_or_job_before_any_training(
    option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from examples.segmentation.__main__ import demo

    monkeypatch.chdir(tmp_path)  # no configs here: past the options, the demo would stop at once with code 2
    with pytest.raises(SystemExit) as exited:
        demo([option, "0"])
    assert exited.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def test_a_teacher_checkpoint_of_an_interrupted_training_is_not_the_finished_teacher(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from examples.segmentation import SegmentationTeacher
    from examples.segmentation.__main__ import unfinished_teacher

    # the teacher config's checkpointing, stopped after 2 epochs (as Ctrl-C leaves it)
    fit = trainer(tmp_path, max_epochs=2, enable_checkpointing=True, limit_val_batches=0,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="teacher", enable_version_counter=False)])
    fit.fit(SegmentationTeacher(**TINY_TEACHER), datamodule=ShapesDataModule(**TINY_DATA))
    config = tmp_path / "teacher.yaml"
    config.write_text("trainer: {max_epochs: 5}\n")
    assert unfinished_teacher(tmp_path / "teacher.ckpt", config) == (
        f"it has trained 2 of the 5 epochs of {config} (an interrupted training?)")
    config.write_text("trainer: {max_epochs: 2}\n")
    assert unfinished_teacher(tmp_path / "teacher.ckpt", config) is None
