"""Bad input never costs a run: each mistake is refused before the first training batch, or at the first step that
can see it, with a message that names what to fix; a run that fails at a stage boundary loses nothing."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_stages.distillation.distillation_module as distillation_module
from lightning_stages import (
    DistillationModule,
    DistillationStepError,
    StageConfigError,
    StageSchedule,
    StageScheduleCallback,
    load_teacher_checkpoint,
)

FINETUNE_THEN_DISTILL = [
    {"name": "finetune", "start_epoch": 0, "end_epoch": 1, "distillation": False},
    {"name": "distill", "start_epoch": 1, "end_epoch": 2, "distillation": True, "loss_weights": {"cls": 0.0}},
]
BATCHES = 4


def make_teacher(hidden: int = 6) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))


class Student(DistillationModule, pl.LightningModule):
    def __init__(self, teacher_path=None, hooks=None, use_adapter=True, teacher_error=None, nan_teacher=False):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.adapter = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 6)
        self.loss_weights = {"cls": 1.0}
        self.teacher_path, self.teacher_error, self.nan_teacher = teacher_path, teacher_error, nan_teacher
        self.hooks = hooks if hooks is not None else {"student": ["body"], "big_teacher": ["1"]}
        self.use_adapter = use_adapter
        self.steps: list[tuple[int, int]] = []

    def configure_teachers(self):
        if self.teacher_error is not None:
            raise self.teacher_error
        torch.manual_seed(1)
        teacher = make_teacher()
        if self.teacher_path is not None:
            load_teacher_checkpoint(teacher, self.teacher_path, name="big_teacher")
        if self.nan_teacher:
            with torch.no_grad():
                teacher[2].bias.fill_(float("nan"))
        return {"big_teacher": teacher}

    def configure_feature_hooks(self):
        return self.hooks

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(torch.relu(self.body(x)))
        distill = {}
        teachers = self.run_teachers(x)
        if teachers:
            distill["kd"] = F.mse_loss(logits, teachers["big_teacher"])  # logit matching
            distill.update(self.feature_losses(adapters={"body": self.adapter} if self.use_adapter else None))
        loss = self.weighted_loss({"cls": F.cross_entropy(logits, y)}, distill)
        self.steps.append((self.current_epoch, batch_idx))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)),
                      batch_size=16 // BATCHES)


def fit(tmp_path, model, schedule=FINETUNE_THEN_DISTILL, callbacks=(), logger=False, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=max(s.get("end_epoch", 0) for s in schedule), logger=logger,
        callbacks=[StageScheduleCallback(stage_schedule=schedule, verbose=False), *callbacks],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    return trainer


def assert_names(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    for part in parts:
        assert part in message, f"{part!r} not in:\n{message}"


# ------------------------------------------------------------------------------------ before the first batch


def test_missing_teacher_checkpoint_names_teacher_path_and_stage(tmp_path):
    path = tmp_path / "teachers" / "big.ckpt"
    model = Student(teacher_path=path)
    with pytest.raises(StageConfigError) as err:
        fit(tmp_path, model)
    assert_names(err, "'big_teacher'", str(path), "no checkpoint file", "stage 1 ('distill')")
    assert model.steps == []  # refused at setup although distillation starts at epoch 1


def test_teacher_checkpoint_of_another_architecture_names_teacher_path_and_keys(tmp_path):
    path = tmp_path / "big.pt"
    torch.save(make_teacher(hidden=5).state_dict(), path)
    model = Student(teacher_path=path)
    with pytest.raises(StageConfigError) as err:
        fit(tmp_path, model)
    assert_names(err, "'big_teacher'", str(path), "does not fit Sequential",
                 "0.weight: checkpoint (5, 4) vs model (6, 4)", "stage 1 ('distill')")
    assert model.steps == []


def test_load_teacher_checkpoint_reads_lightning_checkpoints_and_refuses_other_files(tmp_path):
    source = make_teacher()
    lightning_ckpt = tmp_path / "teacher.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, lightning_ckpt)
    with pytest.raises(ValueError, match=r"missing keys 0\.weight.*pass prefix='net\.'"):
        load_teacher_checkpoint(make_teacher(), lightning_ckpt, name="t")
    loaded = load_teacher_checkpoint(make_teacher(), lightning_ckpt, name="t", prefix="net.")
    for got, expected in zip(loaded.parameters(), source.parameters()):
        assert torch.equal(got, expected)
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"teacher 't': the checkpoint .*notes\.txt' cannot be read as a checkpoint"):
        load_teacher_checkpoint(make_teacher(), garbage, name="t")


@pytest.mark.parametrize(
    ("hooks", "bad", "closest"),
    [
        ({"student": ["bdy"], "big_teacher": ["1"]}, "'bdy'", "closest submodules: `body`"),
        ({"student": ["body"], "big_teacher": ["layer1"]}, "'layer1'", "closest submodules: `0`, `1`, `2`"),
    ],
)
def test_hook_path_naming_no_submodule_lists_the_closest_names(tmp_path, hooks, bad, closest):
    model = Student(hooks=hooks)
    with pytest.raises(StageConfigError) as err:
        fit(tmp_path, model)
    assert_names(err, bad, "names no submodule", closest, "stage 1 ('distill')")
    assert model.steps == []


def test_configure_teachers_raising_names_the_stage_that_needed_it(tmp_path):
    model = Student(teacher_error=RuntimeError("teacher weights are on another machine"))
    with pytest.raises(StageConfigError) as err:
        fit(tmp_path, model)
    assert_names(err, "stage 1 ('distill')", "configure_teachers() raised RuntimeError",
                 "teacher weights are on another machine")
    assert model.steps == []


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("schedule.json", '{\n  "stage_schedule": [\n    {"start_epoch": 0,, "end_epoch": 2}\n  ]\n}\n', 3),
        ("schedule.yaml", "stage_schedule:\n  - start_epoch: 0\n    end_epoch: [2\n  - start_epoch: 2\n", 4),
    ],
)
def test_config_that_is_not_valid_json_or_yaml_names_file_and_line(tmp_path, name, text, line):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(StageConfigError) as err:
        StageScheduleCallback(config=path)
    assert_names(err, f"{path}:{line}:", "not valid " + ("JSON" if name.endswith("json") else "YAML"))
    assert "Traceback" not in str(err.value)


# ------------------------------------------------------------------------------------ at the first distilling step


STEP_HEADER = "1 problem at the first step of stage 'distill':"


def test_feature_shapes_that_do_not_match_without_adapter_name_the_layer_pair(tmp_path):
    model = Student(use_adapter=False)
    with pytest.raises(DistillationStepError) as err:
        fit(tmp_path, model)
    assert str(err.value).startswith(STEP_HEADER)
    assert err.value.stage == "distill"
    assert_names(err, "body -> big_teacher.1: student features (4, 8) do not match teacher features (4, 6)",
                 "adapters={'body': FeatureAdapter(")
    assert "in the stage schedule" not in str(err.value)
    assert model.steps == [(0, i) for i in range(BATCHES)]  # epoch 0 trained; stopped at the first distilling step


def test_hooked_layer_that_captured_nothing_names_the_pair_and_the_stage(tmp_path):
    class NoStudentForward(Student):  # the student's hooked layer is never run: only the teacher's is captured
        def training_step(self, batch, batch_idx):
            x, y = batch
            self.run_teachers(x)
            distill = self.feature_losses(adapters={"body": self.adapter})
            self.steps.append((self.current_epoch, batch_idx))
            return self.weighted_loss({"cls": F.cross_entropy(self.head(torch.zeros(len(x), 8)), y)}, distill)

    model = NoStudentForward()
    with pytest.raises(DistillationStepError) as err:
        fit(tmp_path, model)
    assert str(err.value).startswith(STEP_HEADER)
    assert_names(err, "body -> big_teacher.1: the student layer 'body' captured nothing", "run_teachers()")
    assert model.steps == [(0, i) for i in range(BATCHES)]


def test_hooked_layers_that_do_not_pair_up_name_both_lists_and_the_stage(tmp_path):
    model = Student(hooks={"student": ["body"], "big_teacher": ["0", "1"]})
    with pytest.raises(DistillationStepError) as err:
        fit(tmp_path, model)
    assert str(err.value).startswith(STEP_HEADER)
    assert_names(err, "as many student layers as layers of teacher 'big_teacher'", "got 1 (['body']) and 2 (['0', '1'])")


def test_non_finite_distillation_loss_names_the_loss_the_epoch_and_the_stage(tmp_path):
    model = Student(nan_teacher=True)
    with pytest.raises(DistillationStepError) as err:
        fit(tmp_path, model)
    assert str(err.value).startswith(STEP_HEADER)
    assert_names(err, "stage 'distill'", "`distill_losses.kd` = nan", "is not finite at epoch 1")
    assert "feature" not in str(err.value)  # only the loss that is not finite is named
    assert model.steps == [(0, i) for i in range(BATCHES)]


def test_finite_check_runs_once_per_stage_not_once_per_step(tmp_path, monkeypatch):
    calls = []
    check = distillation_module.check_finite
    monkeypatch.setattr(distillation_module, "check_finite", lambda *args: calls.append(args[1:3]) or check(*args))
    schedule = [
        {"name": "distill", "start_epoch": 0, "end_epoch": 2, "distillation": True},
        {"name": "finetune", "start_epoch": 2, "end_epoch": 3, "distillation": False},
        {"name": "again", "start_epoch": 3, "end_epoch": 4, "distillation": True},
    ]
    model = Student()
    fit(tmp_path, model, schedule=schedule)
    assert len(model.steps) == 4 * BATCHES
    assert calls == [("distill", 0), ("finetune", 2), ("again", 3)]  # one host sync per stage, none per step


# ------------------------------------------------------------------------------------ nothing is lost


def test_failure_at_a_stage_boundary_keeps_checkpoint_and_logs_and_the_run_resumes(tmp_path):
    schedule = [
        {"name": "finetune", "start_epoch": 0, "end_epoch": 2, "distillation": False},
        {"name": "distill", "start_epoch": 2, "end_epoch": 4, "distillation": True},
    ]
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_on_train_epoch_end=True)
    broken = Student(nan_teacher=True)  # the teacher turns out broken exactly when the distill stage begins
    with pytest.raises(StageConfigError, match="is not finite at epoch 2"):
        fit(tmp_path, broken, schedule, [checkpoint], logger=CSVLogger(tmp_path, name="logs"))
    assert broken.steps[-1] == (1, BATCHES - 1)

    # the last checkpoint is whole: the end of epoch 1, with the weights of then and the callback's state
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (1, 2 * BATCHES)
    for key, value in broken.state_dict().items():
        assert torch.equal(last["state_dict"][key], value), key  # nothing trained after the checkpoint
    saved = StageSchedule.from_config(last["callbacks"]["StageScheduleCallback"]["schedule"])
    assert saved.at(last["epoch"]).name == "finetune"
    assert not any(k.startswith("big_teacher") or "teacher" in k for k in last["state_dict"])

    # the logs are flushed: both finetune epochs are there
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(r["step"], r["stage/use_distillation"]) for r in rows if r.get("stage/use_distillation")]
    assert logged[:2] == [("0", "0.0"), (str(BATCHES), "0.0")]

    # the teacher is fixed; the run resumes from the last checkpoint and distills from epoch 2 on
    fixed = Student()
    fit(tmp_path, fixed, schedule, logger=CSVLogger(tmp_path, name="logs", version=0), ckpt_path=ckpt_dir / "last.ckpt")
    assert fixed.steps == [(e, i) for e in (2, 3) for i in range(BATCHES)]
    assert fixed.use_distillation is True and fixed.stage_name == "distill"
