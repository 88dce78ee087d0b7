"""The segmentation example: data, task losses, models, distillation through the plugin, and bad configs."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import yaml

from examples.segmentation import (
    CLASSES,
    TEACHER_COMMAND,
    SegmentationStudent,
    SegmentationTeacher,
    ShapesDataModule,
    count_parameters,
    make_sample,
    task_losses,
)
from lightning_stages import StageConfigError, StageScheduleCallback
from lightning_stages.cli import StagesLightningCLI
from lightning_stages.cli.lightning_config import schedule_of_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ---------------------------------------------------------------------------------------------- helpers


def cli(config: Path, *extra: str) -> StagesLightningCLI:
    return StagesLightningCLI(args=["--config", str(config), *extra], run=False, save_config_callback=None)


# ---------------------------------------------------------------------------------------------- data


def test_samples_are_a_pure_function_of_seed_split_and_index() -> None:
    image, mask, label = make_sample(0, 0, 7)
    again = make_sample(0, 0, 7)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(mask, again[1])
    assert label == again[2]
    assert not np.array_equal(image, make_sample(0, 1, 7)[0]), "val must not repeat train"
    assert not np.array_equal(image, make_sample(1, 0, 7)[0]), "another data seed gives other data"


def test_data_has_every_class_varied_scale_and_binary_masks() -> None:
    samples = [make_sample(0, 0, i) for i in range(200)]
    labels = {s[2] for s in samples}
    areas = np.array([s[1].sum() for s in samples])
    assert labels == set(range(len(CLASSES)))
    assert set(np.unique(np.concatenate([s[1].ravel() for s in samples]))) <= {0.0, 1.0}
    assert np.percentile(areas, 90) > 3 * np.percentile(areas, 10), "shapes should vary in scale"
    assert all(s[0].shape == (3, 32, 32) and s[0].dtype == np.float32 for s in samples)


def test_datamodule_splits_are_fixed_across_instances(tiny_data: dict[str, int]) -> None:
    a, b = ShapesDataModule(**tiny_data), ShapesDataModule(**tiny_data)
    xa, ma, ya = next(iter(a.test_dataloader()))
    xb, mb, yb = next(iter(b.test_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ma, mb) and torch.equal(ya, yb)
    assert xa.shape == (16, 3, 16, 16) and ma.shape == (16, 1, 16, 16)


# ---------------------------------------------------------------------------------------------- losses and models


def test_task_losses_match_reference_formulas() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[-0.2, 1.5], [-2.0, 0.1]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]], [[[0.0, 1.0], [0.0, 0.0]]]])
    cls_logits = torch.tensor([[1.0, 0.0, -1.0, 0.5, 0.0], [0.0, 2.0, 0.0, 0.0, 0.0]])
    label = torch.tensor([0, 1])
    iou_pred = torch.tensor([0.5, 0.9])
    losses = task_losses({"mask": logits, "cls": cls_logits, "iou": iou_pred}, mask, label)

    z, t = logits.numpy().ravel().astype(float), mask.numpy().ravel().astype(float)
    p = 1 / (1 + np.exp(-z))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = np.where(t == 1, p, 1 - p)
    alpha_t = np.where(t == 1, 0.25, 0.75)
    focal = alpha_t * (1 - p_t) ** 2 * bce
    pi, ti = p.reshape(2, 4), t.reshape(2, 4)
    dice = 1 - (2 * (pi * ti).sum(1) + 1) / (pi.sum(1) + ti.sum(1) + 1)
    # thresholded masks: image 0 predicts {0, 2}, target {0, 2, 3} -> 2/3; image 1 predicts {1, 3}, target {1} -> 1/2
    iou = ((0.5 - 2 / 3) ** 2 + (0.9 - 1 / 2) ** 2) / 2
    c = cls_logits.numpy().astype(float)
    log_softmax = c - np.log(np.exp(c).sum(1, keepdims=True))
    cls = -(log_softmax[0, 0] + log_softmax[1, 1]) / 2

    assert sorted(losses) == ["bce", "cls", "dice", "focal", "iou"]
    assert losses["bce"].item() == pytest.approx(bce.mean(), rel=1e-5)
    assert losses["focal"].item() == pytest.approx(focal.mean(), rel=1e-5)
    assert losses["dice"].item() == pytest.approx(dice.mean(), rel=1e-5)
    assert losses["iou"].item() == pytest.approx(iou, rel=1e-5)
    assert losses["cls"].item() == pytest.approx(cls, rel=1e-5)


def test_teacher_has_at_least_ten_times_the_student_parameters() -> None:
    def model_of(name: str) -> torch.nn.Module:
        config = yaml.safe_load((CONFIGS / f"segmentation_{name}.yaml").read_text())["model"]
        cls = SegmentationTeacher if config["class_path"].endswith("SegmentationTeacher") else SegmentationStudent
        args = {k: v for k, v in config["init_args"].items() if k in ("widths", "convs_per_block")}
        return cls(**args).net

    teacher, student = model_of("teacher"), model_of("joint")
    assert count_parameters(teacher) >= 10 * count_parameters(student)


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["distill_finetune", "finetune_distill", "joint", "labels_only", "no_schedule"])
def test_yaml_and_seed_json_configs_give_the_same_schedule(name: str) -> None:
    from_yaml = schedule_of_config(CONFIGS / f"segmentation_{name}.yaml")
    from_json = schedule_of_config(CONFIGS / f"segmentation_{name}.json")
    assert [(r.name, r.start_epoch, r.end_epoch, r.distillation, r.lambda_coef, r.loss_weights, r.data)
            for r in from_yaml.timeline()] == [
        (r.name, r.start_epoch, r.end_epoch, r.distillation, r.lambda_coef, r.loss_weights, r.data)
        for r in from_json.timeline()
    ]


def test_distill_finetune_config_is_the_seed_example_scaled_to_nine_epochs() -> None:
    seed_base = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}
    timeline = schedule_of_config(CONFIGS / "segmentation_distill_finetune.yaml").timeline()
    assert [(r.name, r.start_epoch, r.end_epoch, r.distillation, r.lambda_coef, r.loss_weights, r.data)
            for r in timeline] == [
        ("distill_only", 0, 3, True, 1.0, dict.fromkeys(seed_base, 0.0), "all"),
        ("finetune_only", 3, 9, False, 0.0, seed_base, "labelled"),
    ]


@pytest.mark.parametrize("name", ["distill_finetune", "finetune_distill", "joint", "labels_only"])
def test_demo_configs_distill_on_all_images_and_learn_labels_from_a_tenth(name: str) -> None:
    config = yaml.safe_load((CONFIGS / f"segmentation_{name}.yaml").read_text())
    assert config["data"]["init_args"]["labelled_fraction"] == 0.1
    for stage in schedule_of_config(CONFIGS / f"segmentation_{name}.yaml").timeline():
        assert stage.data == ("all" if stage.distillation else "labelled"), stage.name
    teacher = yaml.safe_load((CONFIGS / "segmentation_teacher.yaml").read_text())
    assert teacher["data"]["init_args"]["labelled_fraction"] == 1.0  # the teacher knows every label


# ---------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize(
    "stages",
    [None, [{"name": "finetune_only", "start_epoch": 0, "distillation": False}]],
    ids=["no_schedule", "finetune_only"],
)
def test_schedule_without_distillation_never_loads_the_teacher(
    tiny_config: Callable[..., Path], tmp_path: Path, stages: Optional[list]
) -> None:
    config = tiny_config("no_schedule", tmp_path, teacher=None, stages=stages)  # the checkpoint does not exist
    run = cli(config)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 2
    assert not run.model.teachers_prepared


def test_missing_teacher_checkpoint_fails_before_training_naming_the_command(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    run = cli(tiny_config("joint", tmp_path, teacher=None))
    with pytest.raises(StageConfigError, match=re.escape(TEACHER_COMMAND)) as err:
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert "stage 0 ('joint')" in str(err.value)
    assert "missing.ckpt" in str(err.value)
    assert run.trainer.global_step == 0


def test_unknown_schedule_key_fails_with_the_core_error_before_parsing(
    tiny_config: Callable[..., Path], tmp_path: Path, teacher_ckpt: Path
) -> None:
    stages = [{"name": "kd", "start_epoch": 0, "distillation": True, "lamda_coef": 0.5}]
    config = tiny_config("joint", tmp_path, teacher_ckpt, stages=stages)
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\): `lamda_coef` = 0.5: .*did you mean `lambda_coef`"):
        StagesLightningCLI(args=["fit", "--config", str(config)])


def test_misspelt_loss_weight_fails_before_training(
    tiny_config: Callable[..., Path], tmp_path: Path, teacher_ckpt: Path
) -> None:
    stages = [{"name": "kd", "start_epoch": 0, "distillation": True, "loss_weights": {"foacl": 0.0}}]
    run = cli(tiny_config("joint", tmp_path, teacher_ckpt, stages=stages))
    with pytest.raises(StageConfigError, match=r"`loss_weights.foacl` = 0.0: .*did you mean `focal`"):
        run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 0


def test_distillation_runs_through_the_mixin_and_trains_the_adapter(
    tiny_config: Callable[..., Path], tmp_path: Path, teacher_ckpt: Path
) -> None:
    run = cli(tiny_config("joint", tmp_path, teacher_ckpt))
    adapter_before = run.model.hint_adapter.proj.weight.detach().clone()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    logged = run.trainer.callback_metrics
    for name in ("train/loss_mask_kd", "train/loss_cls_kd", "train/loss_hint"):
        assert name in logged and math.isfinite(float(logged[name]))
    assert not torch.equal(adapter_before, run.model.hint_adapter.proj.weight)
    assert set(run.model.teachers) == {"teacher"}
    assert not any(key.startswith("teacher") for key in run.model.state_dict())
    assert all(not p.requires_grad for p in run.model.teachers["teacher"].parameters())


def test_metrics_are_logged_under_their_usual_names_and_match_a_reference(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    run = cli(tiny_config("no_schedule", tmp_path, teacher=None))
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert {"val/iou", "val/dice", "val/acc"} <= set(run.trainer.callback_metrics)
    result = run.trainer.test(run.model, datamodule=run.datamodule, verbose=False)[0]

    model = run.model.eval()
    x, mask, label = (torch.cat(t) for t in zip(*run.datamodule.test_dataloader()))
    with torch.no_grad():
        out = model(x)
    pred, target = out["mask"] > 0, mask > 0.5
    inter, union = (pred & target).sum().item(), (pred | target).sum().item()
    assert result["test/iou"] == pytest.approx(inter / union, abs=1e-6)
    assert result["test/dice"] == pytest.approx(2 * inter / (pred.sum().item() + target.sum().item()), abs=1e-6)
    assert result["test/acc"] == pytest.approx((out["cls"].argmax(1) == label).float().mean().item(), abs=1e-6)


def test_stages_option_trains_with_a_seed_json_schedule(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    run = cli(tiny_config("no_schedule", tmp_path, teacher=None), "--stages",
              str(CONFIGS / "segmentation_distill_finetune.json"))
    callbacks = [cb for cb in run.trainer.callbacks if isinstance(cb, StageScheduleCallback)]
    assert len(callbacks) == 1
    assert [s.name for s in callbacks[0].schedule.stages] == ["distill_only", "finetune_only"]
    assert callbacks[0].schedule.total_epochs == 9


def test_stages_option_with_a_schedule_already_in_the_config_is_an_error(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = tiny_config("joint", tmp_path, teacher=None)
    with pytest.raises(StageConfigError, match="already has a StageScheduleCallback"):
        cli(config, "--stages", str(CONFIGS / "segmentation_distill_finetune.json"))


def test_a_second_schedule_added_on_the_command_line_is_the_library_s_error_not_lightning_s(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = tiny_config("joint", tmp_path, teacher=None)
    with pytest.raises(StageConfigError, match="more than one StageScheduleCallback") as info:
        cli(config, "--trainer.callbacks+=lightning_stages.StageScheduleCallback",
            "--trainer.callbacks.stage_schedule=[{start_epoch: 0, lambda_coef: 0.5}]")
    assert (info.value.problems[0].field, info.value.problems[0].value) == ("trainer.callbacks", 2)


@pytest.mark.parametrize("option", ["--trainer.callbacks.stage_schedule", "--trainer.callbacks.init_args.stage_schedule"])
def test_a_schedule_given_on_the_command_line_is_checked_before_parsing(
    tiny_config: Callable[..., Path], tmp_path: Path, option: str
) -> None:
    config = tiny_config("no_schedule", tmp_path, teacher=None)
    with pytest.raises(StageConfigError, match="did you mean `lambda_coef`") as info:  # not the parser's long message
        cli(config, "--trainer.callbacks+=lightning_stages.StageScheduleCallback",
            option, "[{start_epoch: 0, lamda_coef: 0.5}]")
    assert (info.value.problems[0].field, info.value.problems[0].value) == ("lamda_coef", 0.5)
    with pytest.raises(StageConfigError, match="given twice"):
        cli(config, "--trainer.callbacks+=lightning_stages.StageScheduleCallback",
            f"{option}=[{{start_epoch: 0, lambda_coef: 0.5, lambda_coef: 1.0}}]")
    built = cli(config, "--trainer.callbacks+=lightning_stages.StageScheduleCallback",
                f"{option}=[{{name: warm, start_epoch: 0, lambda_coef: 0.5}}]")
    callbacks = [c for c in built.trainer.callbacks if isinstance(c, StageScheduleCallback)]
    assert [[s.name for s in c.schedule.stages] for c in callbacks] == [["warm"]]


@pytest.mark.parametrize("option", ["--trainer.callbacks.config", "--trainer.callbacks.init_args.config"])
def test_a_schedule_file_given_to_the_callback_on_the_command_line_is_checked_before_parsing(
    tiny_config: Callable[..., Path], tmp_path: Path, option: str
) -> None:
    config = tiny_config("no_schedule", tmp_path, teacher=None)
    bad = tmp_path / "nan.json"
    bad.write_text('{"train": {"epochs": 2}, "stage_schedule": [{"name": "kd", "start_epoch": 0, "lambda_coef": NaN}]}')
    with pytest.raises(StageConfigError, match="must be finite") as info:  # before: the parser's own error
        cli(config, "--trainer.callbacks+=lightning_stages.StageScheduleCallback", f"{option}={bad}")
    problem = info.value.problems[0]
    assert (problem.index, problem.name, problem.field) == (0, "kd", "lambda_coef") and math.isnan(problem.value)


@pytest.mark.parametrize("section", ["validate", "test", "predict"])
def test_a_schedule_in_another_subcommand_s_section_is_checked_before_parsing(
    tiny_config: Callable[..., Path], tmp_path: Path, section: str
) -> None:
    # LightningCLI's parser reads every subcommand's section whichever runs: a misspelt key in the `test:` section
    # stopped `fit` with the parser's long message; now it is the library's error, naming the section
    fit = yaml.safe_load(tiny_config("no_schedule", tmp_path, teacher=None).read_text())
    schedule = [{"name": "kd", "start_epoch": 0, "lamda_coef": 0.5}]
    other = {"trainer": {"callbacks": [{"class_path": "lightning_stages.StageScheduleCallback",
                                         "init_args": {"stage_schedule": schedule}}]}}
    config = tmp_path / "sections.yaml"
    config.write_text(yaml.safe_dump({"fit": fit, section: other}))
    with pytest.raises(StageConfigError, match=re.escape(f"(in the `{section}` section); did you mean `lambda_coef`")
                       ) as info:
        StagesLightningCLI(args=["--config", str(config), "fit"], save_config_callback=None)
    problem = info.value.problems[0]
    assert (problem.index, problem.name, problem.field, problem.value) == (0, "kd", "lamda_coef", 0.5)
    with pytest.raises(StageConfigError, match=f"in the `{section}` section"):
        schedule_of_config(config)  # `lightning-stages validate` reads the file the same way
    schedule[0]["lambda_coef"] = schedule[0].pop("lamda_coef")  # a good schedule there is no problem
    config.write_text(yaml.safe_dump({"fit": fit, section: other}))
    assert schedule_of_config(config).stages == ()  # the fit run's schedule: none


def test_stages_option_after_a_config_that_clears_the_callbacks(tiny_config: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    # the first config's schedule is replaced by the second's empty callbacks: `--stages` is the only schedule
    config = tiny_config("joint", tmp_path, teacher=None)
    cleared = tmp_path / "cleared.yaml"
    cleared.write_text("trainer:\n  callbacks: []\n")
    built = cli(config, "--config", str(cleared), "--stages", str(CONFIGS / "segmentation_distill_finetune.json"))
    callbacks = [c for c in built.trainer.callbacks if isinstance(c, StageScheduleCallback)]
    assert [[s.name for s in c.schedule.stages] for c in callbacks] == [["distill_only", "finetune_only"]]
