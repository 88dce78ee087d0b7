"""DistillationModule: teachers, hooks, run_teachers, weighted_loss, and the single-stage (legacy) equivalence."""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import FIVE_WEIGHTS, PlainStudent, Student, loader, trainer

from lightning_stages import DistillationStepError, StageConfigError, StageScheduleCallback


def hook_count(module: torch.nn.Module) -> int:
    return len(module._forward_hooks)


def test_hooks_exist_only_while_distilling():
    model = Student()
    model.prepare_teachers()
    teacher = model.teachers["teacher"]
    assert hook_count(model.body) == hook_count(teacher.body) == 0
    model.use_distillation = True
    assert hook_count(model.body) == hook_count(teacher.body) == 1
    model.use_distillation = True  # idempotent
    assert hook_count(model.body) == 1
    model.run_teachers(torch.randn(3, 6))
    model(torch.randn(3, 6))
    assert set(model.captured_features()) == {"body"}
    assert model.captured_features("teacher")["body"].shape == (3, 16)
    model.use_distillation = False
    assert hook_count(model.body) == hook_count(teacher.body) == 0
    assert dict(model.captured_features()) == {} and dict(model.captured_features("teacher")) == {}


def test_run_teachers_does_nothing_when_off():
    model = Student()
    model.prepare_teachers()
    assert model.run_teachers(torch.randn(2, 6)) == {}
    assert model.teachers["teacher"].calls == 0


def test_teacher_outputs_are_usable_in_the_students_loss():
    model = Student()
    model.prepare_teachers()
    model.use_distillation = True
    x = torch.randn(5, 6)
    out = model.run_teachers(x)["teacher"]
    assert not out.requires_grad and not out.is_inference()
    student = model(x)
    loss = F.mse_loss(student, out) + F.mse_loss(model.adapter(model.captured_features()["body"]),
                                                 model.captured_features("teacher")["body"])
    loss.backward()
    assert model.head.weight.grad is not None and model.adapter.proj.weight.grad is not None
    assert all(p.grad is None for p in model.teachers["teacher"].parameters())


def test_weighted_loss_matches_the_formula():
    model = Student()
    model.loss_weights = {"bce": 2.0, "cls": 0.5}
    model.lambda_coef = 0.3
    a, b, d1, d2 = (torch.tensor(v) for v in (1.5, 4.0, 0.2, 0.7))
    model.use_distillation = False
    assert model.weighted_loss({"bce": a, "cls": b}, {"kd": d1}).item() == pytest.approx(2.0 * 1.5 + 0.5 * 4.0)
    model.use_distillation = True
    expected = 2.0 * 1.5 + 0.5 * 4.0 + 0.3 * (0.2 + 0.7)
    assert model.weighted_loss({"bce": a, "cls": b}, {"kd": d1, "feat": d2}).item() == pytest.approx(expected)
    assert model.weighted_loss({"bce": a, "cls": b}, [d1, d2]).item() == pytest.approx(expected)


def test_weighted_loss_rejects_a_task_loss_without_weight_naming_the_stage():
    model = Student()
    model.stage_name = "kd"
    with pytest.raises(DistillationStepError, match=r"`task_losses` = 'foacl'.*did you mean `focal`") as err:
        model.weighted_loss({"foacl": torch.tensor(1.0)})
    assert str(err.value).startswith("1 problem at a step of stage 'kd':\n  - stage 'kd': `task_losses` = 'foacl'")
    assert isinstance(err.value, StageConfigError)  # existing `except StageConfigError` code still catches it


def test_feature_losses_pair_the_hooked_layers_and_turn_a_mismatch_into_a_step_error():
    model = Student()
    model.prepare_teachers()
    model.stage_name, model.use_distillation = "distill", True
    x = torch.randn(3, 6)
    model(x)
    model.run_teachers(x)
    student, teacher = model.captured_features()["body"], model.captured_features("teacher")["body"]
    got = model.feature_losses(adapters={"body": model.adapter})
    assert list(got) == ["body__teacher.body"]
    assert got["body__teacher.body"].item() == pytest.approx(((model.adapter(student) - teacher) ** 2).mean().item())
    with pytest.raises(DistillationStepError) as err:
        model.feature_losses()  # no adapter: the student's features are narrower than the teacher's
    assert str(err.value).startswith("1 problem at the first step of stage 'distill':\n  - stage 'distill': "
                                     "body -> teacher.body: student features")
    assert err.value.stage == "distill"
    model.use_distillation = False
    assert model.feature_losses() == {}


def test_deep_copies_and_pickles_do_not_carry_the_teacher():
    model = Student()
    model.prepare_teachers()
    model.use_distillation = True
    clone = copy.deepcopy(model)
    assert not clone.teachers_prepared and dict(clone.teachers) == {}
    clone(torch.randn(2, 6))  # the copied hook must not write into the original's features
    assert dict(model.captured_features()) == {}
    restored = pickle.loads(pickle.dumps(model))
    assert dict(restored.teachers) == {}


def test_mixin_after_lightning_module_is_refused():
    class Wrong(pl.LightningModule, type(Student()).__mro__[1]):  # LightningModule first, DistillationModule second
        def configure_teachers(self):
            return {"teacher": torch.nn.Linear(1, 1)}

    with pytest.raises(StageConfigError, match=r"class Wrong\(DistillationModule, LightningModule\)"):
        Wrong().prepare_teachers()


def test_configure_teachers_raising_names_the_stage(tmp_path):
    class Broken(Student):
        def configure_teachers(self):
            raise FileNotFoundError("teacher.ckpt")

    callback = StageScheduleCallback(stage_schedule=[{"start_epoch": 0, "end_epoch": 1},
                                                     {"name": "kd", "start_epoch": 1, "distillation": True}])
    with pytest.raises(StageConfigError, match=r"stage 1 \('kd'\).*configure_teachers\(\) raised FileNotFoundError"):
        trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(Broken(), loader())


@pytest.mark.parametrize("weights", [None, {"bce": 0.5, "focal": 2.0, "dice": 0.0, "iou": 3.0, "cls": 1.0}])
def test_no_schedule_is_bitwise_the_plain_single_stage_training(tmp_path, weights):
    """The plugin's module with no schedule trains exactly as the same module written without the plugin."""
    pl.seed_everything(7, verbose=False)
    plain = PlainStudent(weights)
    start = copy.deepcopy(plain.state_dict())
    plugin = Student(weights)
    plugin.load_state_dict({**plugin.state_dict(), **start})  # same start; the adapter is extra and unused

    pl.seed_everything(11, verbose=False)
    trainer(tmp_path / "plain", max_epochs=3).fit(plain, loader())
    pl.seed_everything(11, verbose=False)
    trainer(tmp_path / "plugin", max_epochs=3, callbacks=[StageScheduleCallback()]).fit(plugin, loader())

    assert len(plain.losses) == 6
    assert torch.equal(torch.stack(plain.losses), torch.stack(plugin.losses))
    assert all(row[1:] == ("base", False, 1.0, dict(weights or FIVE_WEIGHTS)) for row in plugin.seen)
    assert plugin.teacher_builds == 0


class ConvertedStudent(Student):
    """The conftest student, its batches in the module's dtype (as with ``Trainer(precision="bf16-true")``)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x.to(self.dtype), y), batch_idx)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_teachers_built_after_the_trainer_converted_the_module_follow_its_dtype(tmp_path, precision, dtype):
    """The callback builds the teachers after Lightning converted the module: they stayed float32, and the first
    distilling step failed with a dtype mismatch."""
    model = ConvertedStudent()
    callback = StageScheduleCallback(stage_schedule=[{"name": "kd", "start_epoch": 0, "distillation": True}],
                                     verbose=False)
    trainer(tmp_path, max_epochs=1, callbacks=[callback], precision=precision, deterministic=False).fit(model, loader())
    teacher = model.teachers["teacher"]
    assert {p.dtype for p in teacher.parameters()} == {dtype} == {p.dtype for p in model.parameters()}
    assert teacher.calls == 2 and all(torch.isfinite(loss) for loss in model.losses)


def test_teachers_keep_their_dtype_beside_a_student_of_mixed_or_default_dtypes():
    model = Student()
    model.body.half()  # mixed: which dtype the teachers should take is not known
    model.prepare_teachers()
    assert {p.dtype for p in model.teachers["teacher"].parameters()} == {torch.float32}
