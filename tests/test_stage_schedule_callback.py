"""Trainer-level behaviour of StageScheduleCallback: which stage runs when, what it sets, what it logs."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import FIVE_WEIGHTS, PlainStudent, Student, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_stages import StageConfigError, StageSchedule, StageScheduleCallback

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

DISTILL_THEN_FINETUNE = [
    {"name": "distill_only", "start_epoch": 0, "end_epoch": 2, "distillation": True, "lambda_coef": 1.0,
     "loss_weights": {"bce": 0, "focal": 0, "dice": 0, "iou": 0, "cls": 0}},
    {"name": "finetune_only", "start_epoch": 2, "end_epoch": 4, "distillation": False, "lambda_coef": 0.0,
     "loss_weights": {"bce": 1.0, "focal": 15, "dice": 1.0, "iou": 1.0, "cls": 1.0}},
]
FINETUNE_THEN_DISTILL = [
    {"name": "finetune_first", "start_epoch": 0, "end_epoch": 2, "distillation": False, "lambda_coef": 0.0,
     "loss_weights": {"bce": 1.0, "focal": 15, "dice": 1.0, "iou": 1.0, "cls": 1.0}},
    {"name": "distill_second", "start_epoch": 2, "end_epoch": 4, "distillation": True, "lambda_coef": 1.0,
     "loss_weights": {"bce": 0, "focal": 0, "dice": 0, "iou": 0, "cls": 0}},
]
ZEROS = dict.fromkeys(FIVE_WEIGHTS, 0.0)


def per_epoch(model: Student) -> dict[int, tuple]:
    """What the training steps of each epoch saw (and check every step of an epoch saw the same)."""
    out: dict[int, tuple] = {}
    for epoch, name, distill, coef, weights in model.seen:
        row = (name, distill, coef, weights)
        assert out.setdefault(epoch, row) == row, f"stage changed inside epoch {epoch}"
    return out


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (
            DISTILL_THEN_FINETUNE,
            {
                0: ("distill_only", True, 1.0, ZEROS),
                1: ("distill_only", True, 1.0, ZEROS),
                2: ("finetune_only", False, 0.0, FIVE_WEIGHTS),
                3: ("finetune_only", False, 0.0, FIVE_WEIGHTS),
            },
        ),
        (
            FINETUNE_THEN_DISTILL,
            {
                0: ("finetune_first", False, 0.0, FIVE_WEIGHTS),
                1: ("finetune_first", False, 0.0, FIVE_WEIGHTS),
                2: ("distill_second", True, 1.0, ZEROS),
                3: ("distill_second", True, 1.0, ZEROS),
            },
        ),
    ],
)
def test_stages_switch_at_their_epochs(tmp_path, schedule, expected):
    model = Student()
    trainer(tmp_path, callbacks=[StageScheduleCallback(stage_schedule=schedule)]).fit(model, loader())
    assert per_epoch(model) == expected


def test_teacher_runs_only_in_distilling_epochs(tmp_path):
    model = Student()
    trainer(tmp_path, callbacks=[StageScheduleCallback(stage_schedule=FINETUNE_THEN_DISTILL)]).fit(model, loader())
    # cumulative teacher forwards at the end of each epoch: 2 batches per epoch, only epochs 2 and 3 distil
    assert model.teacher_calls_per_epoch == {0: 0, 1: 0, 2: 2, 3: 4}
    assert model.teacher_builds == 1


def test_partial_weights_and_omitted_lambda_inherit_the_base(tmp_path):
    schedule = [
        {"name": "warm", "start_epoch": 0, "end_epoch": 1, "loss_weights": {"focal": 0.5}},
        {"name": "rest", "start_epoch": 1, "distillation": True},
    ]
    model = Student()
    callback = StageScheduleCallback(stage_schedule=schedule, lambda_coef=0.25, loss_weights={"cls": 3.0})
    trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, loader())
    base = {**FIVE_WEIGHTS, "cls": 3.0}
    assert per_epoch(model) == {
        0: ("warm", False, 0.25, {**base, "focal": 0.5}),
        1: ("rest", True, 0.25, base),
    }


def test_no_distilling_stage_never_builds_the_teacher(tmp_path):
    model = Student()
    callback = StageScheduleCallback(stage_schedule=[{"start_epoch": 0, "distillation": False}])
    trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, loader())
    assert model.teacher_builds == 0
    assert not model.teachers_prepared
    assert {row[2] for row in model.seen} == {False}


def test_a_distilling_stage_builds_the_teacher_although_the_base_flag_is_off(tmp_path):
    model = Student()
    callback = StageScheduleCallback(
        stage_schedule=[{"start_epoch": 1, "distillation": True}], distillation=False
    )
    with pytest.warns(UserWarning, match=r"no stage covers epochs \[0, 1\)"):
        trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, loader())
    assert model.teacher_builds == 1
    assert per_epoch(model)[0][:2] == ("base", False)
    assert per_epoch(model)[1][:2] == ("stage_0", True)


def test_teacher_is_not_in_checkpoint_optimizer_or_parameters(tmp_path):
    model = Student()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(
        tmp_path, max_epochs=1, callbacks=[StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE[:1]), ckpt],
        enable_checkpointing=True,
    ).fit(model, loader())
    teacher = model.teachers["teacher"]
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert teacher_ids and not teacher_ids & {id(p) for p in model.parameters()}
    optimizer_params = [p for group in model.trainer.optimizers[0].param_groups for p in group["params"]]
    assert not teacher_ids & {id(p) for p in optimizer_params}
    checkpoint = torch.load(ckpt.last_model_path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(PlainStudent().state_dict()) | {
        "adapter.proj.weight", "adapter.proj.bias"
    }
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_follows_the_module_dtype_and_device():
    model = Student()
    model.prepare_teachers()
    model.to(torch.float64)
    assert {p.dtype for p in model.teachers["teacher"].parameters()} == {torch.float64}
    model.to("meta")
    assert {p.device.type for p in model.teachers["teacher"].parameters()} == {"meta"}


def _checkpoint_trainer(tmp_path, every_n_train_steps=None, max_epochs=4, **kwargs):
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=every_n_train_steps,
        filename="{epoch}-{step}",
    )
    return trainer(
        tmp_path, max_epochs=max_epochs, enable_checkpointing=True,
        callbacks=[StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE), ckpt], **kwargs,
    )


@pytest.mark.parametrize(
    ("checkpoint_name", "every_n_train_steps", "first_epoch_after_resume"),
    [
        ("epoch=1-step=4.ckpt", None, 2),  # end of epoch 1: the resumed run starts at the boundary, in finetune
        ("epoch=2-step=5.ckpt", 1, 2),  # after the first of two batches of epoch 2: resumes mid-epoch in finetune
    ],
)
def test_resume_applies_the_stage_of_the_resumed_epoch(tmp_path, checkpoint_name, every_n_train_steps,
                                                       first_epoch_after_resume):
    _checkpoint_trainer(tmp_path, every_n_train_steps=every_n_train_steps).fit(Student(), loader())
    path = tmp_path / "ckpt" / checkpoint_name
    assert path.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed = Student()
    _checkpoint_trainer(tmp_path / "resumed").fit(resumed, loader(), ckpt_path=path)
    seen = per_epoch(resumed)
    assert min(seen) == first_epoch_after_resume
    assert seen[2] == ("finetune_only", False, 0.0, FIVE_WEIGHTS)
    if every_n_train_steps:
        steps_in_epoch_2 = [row for row in resumed.seen if row[0] == 2]
        assert len(steps_in_epoch_2) == 1  # one batch of epoch 2 was left, and it ran as finetune


@pytest.mark.parametrize(("checkpoint_name", "every_n_train_steps"),
                         [("epoch=1-step=4.ckpt", None), ("epoch=2-step=5.ckpt", 1)])
def test_a_resumed_run_logs_each_of_its_epochs_once(tmp_path, caplog, checkpoint_name, every_n_train_steps):
    _checkpoint_trainer(tmp_path, every_n_train_steps=every_n_train_steps).fit(Student(), loader())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_stages"):
        _checkpoint_trainer(tmp_path / "resumed").fit(Student(), loader(), ckpt_path=tmp_path / "ckpt" / checkpoint_name)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lightning_stages")]
    assert [line.split(":")[0] for line in lines] == ["epoch 2", "epoch 3"]
    assert all("stage 'finetune_only' (2/2)" in line for line in lines)


@pytest.mark.parametrize(("checkpoint_name", "every_n_train_steps", "first_epoch"),
                         [("epoch=2-step=6.ckpt", None, 3), ("epoch=2-step=5.ckpt", 1, 2)])
def test_a_run_resumed_inside_a_stage_writes_the_stage_text_once_at_its_first_epoch(
        tmp_path, checkpoint_name, every_n_train_steps, first_epoch):
    _checkpoint_trainer(tmp_path, every_n_train_steps=every_n_train_steps).fit(Student(), loader())
    logger = TensorBoardLogger(tmp_path, name="tb")
    _checkpoint_trainer(tmp_path / "resumed", logger=logger, log_every_n_steps=1).fit(
        Student(), loader(), ckpt_path=tmp_path / "ckpt" / checkpoint_name)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("stage/text_summary")]
    assert len(texts) == 1
    assert texts[0].startswith(f"epoch {first_epoch}: stage 'finetune_only' (2/2)")
    assert [e.value for e in events.Scalars("stage/number")] == [2.0] * (4 - first_epoch)


def test_resume_under_a_changed_schedule_warns_and_names_the_change(tmp_path):
    _checkpoint_trainer(tmp_path).fit(Student(), loader())
    changed = [dict(DISTILL_THEN_FINETUNE[0]), dict(DISTILL_THEN_FINETUNE[1], lambda_coef=0.5)]
    callback = StageScheduleCallback(stage_schedule=changed)
    with pytest.warns(UserWarning, match=r"stage 1 \('finetune_only'\): lambda_coef 0.0 -> 0.5"):
        trainer(tmp_path / "r", max_epochs=4, callbacks=[callback]).fit(
            Student(), loader(), ckpt_path=tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
        )


def test_state_dict_holds_the_schedule_and_round_trips_silently_into_the_same_schedule():
    import warnings

    callback = StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE, lambda_coef=0.5)
    state = callback.state_dict()
    # exactly what resume reads, and it reads back into the schedule given
    assert set(state) == {"schedule", "adaptive"}
    # nothing of plateau-ended stages happened before training (tests/test_adaptive_stages.py fills it)
    assert state["adaptive"] == {"transitions": {}, "tracker": None,
                                 "best_weights": {"where": "memory", "weights": None, "path": None, "step": None}}
    assert StageSchedule.from_config(state["schedule"]) == callback.schedule
    assert state["schedule"]["distillation"] == {"lambda_coef": 0.5}
    assert [stage["name"] for stage in state["schedule"]["stage_schedule"]] == ["distill_only", "finetune_only"]
    same = StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE, lambda_coef=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)
    assert same.state_dict() == state


def test_loading_the_state_of_another_schedule_names_every_change():
    state = StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE, lambda_coef=0.5).state_dict()
    changed = [DISTILL_THEN_FINETUNE[0], dict(DISTILL_THEN_FINETUNE[1], end_epoch=6)]
    other = StageScheduleCallback(stage_schedule=changed)
    with pytest.warns(UserWarning, match=r"base lambda_coef 0.5 -> None; stage 1 \('finetune_only'\): end_epoch 4 -> 6"):
        other.load_state_dict(state)


def test_a_0_1_state_with_epoch_and_stage_keys_loads():
    import warnings

    callback = StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE)
    state_0_1 = {**callback.state_dict(), "epoch": 3, "stage": "finetune_only"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE).load_state_dict(state_0_1)


def test_the_state_after_setup_is_the_bound_schedule(tmp_path):
    callback = StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE)
    trainer(tmp_path, callbacks=[callback]).fit(Student(), loader())
    state = callback.state_dict()
    assert state["schedule"]["train"] == {"loss_weights": FIVE_WEIGHTS, "epochs": 4}


def test_the_stage_line_is_logged_once_per_epoch(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_stages"):
        trainer(tmp_path, callbacks=[StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE)]).fit(
            Student(), loader()
        )
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lightning_stages")]
    assert len(lines) == 4
    assert lines[0].startswith("epoch 0: stage 'distill_only' (1/2), use_distillation=True, lambda_coef=1.0")
    assert lines[3].startswith("epoch 3: stage 'finetune_only' (2/2), use_distillation=False, lambda_coef=0.0")
    assert "bce=1.0 focal=15.0 dice=1.0 iou=1.0 cls=1.0" in lines[3]


def test_tensorboard_gets_stage_scalars_and_keeps_the_module_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(
        tmp_path, logger=logger, log_every_n_steps=1,
        callbacks=[StageScheduleCallback(stage_schedule=FINETUNE_THEN_DISTILL)],
    ).fit(Student(), loader())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert "train/loss" in scalars  # the module's own scalar, under its own name
    expected = {"stage/number", "stage/use_distillation", "stage/lambda_coef"} | {
        f"stage/weight_{k}" for k in FIVE_WEIGHTS
    }
    assert expected <= scalars
    assert [e.value for e in events.Scalars("stage/use_distillation")] == [0.0, 0.0, 1.0, 1.0]
    assert [e.value for e in events.Scalars("stage/weight_focal")] == [15.0, 15.0, 0.0, 0.0]
    texts = events.Tensors("stage/text_summary")
    assert len(texts) == 2  # one per stage change
    assert b"distill_second" in texts[1].tensor_proto.string_val[0]


def test_bad_weight_key_is_reported_before_the_first_batch(tmp_path):
    model = Student()
    callback = StageScheduleCallback(stage_schedule=[{"name": "s", "start_epoch": 0, "loss_weights": {"foacl": 1}}])
    with pytest.raises(StageConfigError, match=r"stage 0 \('s'\): `loss_weights.foacl` = 1: .*did you mean `focal`"):
        trainer(tmp_path, callbacks=[callback]).fit(model, loader())
    assert model.seen == []


def test_bad_base_weight_key_is_reported(tmp_path):
    callback = StageScheduleCallback(loss_weights={"diec": 1.0})
    with pytest.raises(StageConfigError, match=r"`loss_weights.diec` = 1.0: .*did you mean `dice`"):
        trainer(tmp_path, callbacks=[callback]).fit(Student(), loader())


def test_stage_at_or_beyond_max_epochs_is_an_error(tmp_path):
    callback = StageScheduleCallback(stage_schedule=[{"start_epoch": 0, "end_epoch": 4}, {"name": "late", "start_epoch": 4}])
    with pytest.raises(StageConfigError, match=r"stage 1 \('late'\): `start_epoch` = 4: starts at or beyond max_epochs"):
        trainer(tmp_path, max_epochs=4, callbacks=[callback]).fit(Student(), loader())


def test_distillation_needs_a_distillation_module(tmp_path):
    model = PlainStudent()
    callback = StageScheduleCallback(stage_schedule=[{"name": "kd", "start_epoch": 0, "distillation": True}])
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\).*not a DistillationModule"):
        trainer(tmp_path, callbacks=[callback]).fit(model, loader())


def test_configure_teachers_returning_nothing_is_an_error(tmp_path):
    class NoTeacher(Student):
        def configure_teachers(self):
            return {}

    model = NoTeacher()
    callback = StageScheduleCallback(stage_schedule=[{"name": "kd", "start_epoch": 0, "distillation": True}])
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\).*returned no teachers"):
        trainer(tmp_path, callbacks=[callback]).fit(model, loader())
    assert model.seen == []


def test_a_hook_path_naming_no_submodule_is_an_error(tmp_path):
    model = Student(hooks={"student": ["bdy"], "teacher": ["body"]})
    callback = StageScheduleCallback(stage_schedule=[{"start_epoch": 0, "distillation": True}])
    with pytest.raises(StageConfigError, match=r"`configure_feature_hooks.student` = 'bdy': names no submodule.*`body`"):
        trainer(tmp_path, callbacks=[callback]).fit(model, loader())
    assert model.seen == []


def test_schedule_errors_are_collected_in_init():
    with pytest.raises(StageConfigError) as info:
        StageScheduleCallback(
            stage_schedule=[
                {"name": "a", "start_epoch": 0, "end_epoch": 5, "lamda_coef": 0.5},
                {"name": "b", "start_epoch": 3, "end_epoch": 2, "loss_weights": {"bce": -1}},
            ]
        )
    message = str(info.value)
    assert "stage 0 ('a'): `lamda_coef` = 0.5: is not a stage field; did you mean `lambda_coef`?" in message
    assert "stage 1 ('b'): `end_epoch` = 2: must be greater than `start_epoch` (3)" in message
    assert "stage 1 ('b'): `loss_weights.bce` = -1: must be >= 0" in message


def test_stage_schedule_and_config_are_exclusive():
    with pytest.raises(StageConfigError, match="either `stage_schedule` or `config`"):
        StageScheduleCallback(stage_schedule=[], config=str(CONFIGS / "seed_distill_finetune.json"))


def test_callback_from_a_seed_json_config(tmp_path):
    callback = StageScheduleCallback(config=str(CONFIGS / "seed_distill_finetune.json"))
    model = Student()
    # the config is full size (300 epochs): run its first 2 epochs (4 steps) and check the boundary by resolution
    trainer(tmp_path, max_epochs=300, max_steps=4, callbacks=[callback]).fit(model, loader())
    assert sorted(per_epoch(model)) == [0, 1]
    assert per_epoch(model)[0] == ("distill_only", True, 1.0, ZEROS)
    assert callback.resolved_schedule.at(100).name == "finetune_only"
    assert callback.resolved_schedule.at(299).loss_weights == FIVE_WEIGHTS


def test_full_size_seed_config_under_a_short_run_names_the_stage_that_would_never_run(tmp_path):
    callback = StageScheduleCallback(config=str(CONFIGS / "seed_finetune_distill.json"))
    with pytest.raises(StageConfigError, match=r"stage 1 \('distill_second'\): `start_epoch` = 100: .*max_epochs \(10\)"):
        trainer(tmp_path, max_epochs=10, callbacks=[callback]).fit(Student(), loader())


def test_validate_before_fit_uses_the_base_settings_and_builds_no_teacher(tmp_path):
    class Validating(Student):
        def validation_step(self, batch, batch_idx):
            self.seen.append((-1, self.stage_name, self.use_distillation, self.lambda_coef, dict(self.loss_weights)))

    model = Validating()
    callback = StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE)
    trainer(tmp_path, callbacks=[callback]).validate(model, loader())
    assert model.teacher_builds == 0
    assert per_epoch(model) == {-1: ("base", False, 1.0, FIVE_WEIGHTS)}


def test_entering_an_epoch_twice_changes_nothing(tmp_path):
    model = Student()
    callback = StageScheduleCallback(stage_schedule=DISTILL_THEN_FINETUNE)
    t = trainer(tmp_path, callbacks=[callback])
    t.fit(model, loader())
    callback.on_train_epoch_start(t, model)
    first = (dict(model.loss_weights), model.use_distillation, model.lambda_coef, model.stage_name)
    callback.on_train_epoch_start(t, model)
    assert first == (dict(model.loss_weights), model.use_distillation, model.lambda_coef, model.stage_name)
    assert first[3] == callback.resolved_schedule.at(t.current_epoch).name


def test_module_without_declared_weights_takes_them_from_the_schedule(tmp_path):
    class Undeclared(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(6, 2)
            self.weights_seen = []

        def training_step(self, batch, batch_idx):
            self.weights_seen.append(dict(self.loss_weights))
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Undeclared()
    schedule = [{"start_epoch": 0, "end_epoch": 1, "loss_weights": {"a": 1}}, {"start_epoch": 1, "loss_weights": {"a": 2}}]
    trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(stage_schedule=schedule)]).fit(model, loader())
    assert model.weights_seen == [{"a": 1.0}] * 2 + [{"a": 2.0}] * 2
