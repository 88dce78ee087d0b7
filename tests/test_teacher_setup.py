"""teacher_setup: what configure_teachers returns, checked, and the freezing that leaves the student's modules alone."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import loader, trainer
from torch import nn

from lightning_stages import DistillationModule, IndexedDataset, StageConfigError, StageScheduleCallback, TeacherCache
from lightning_stages.distillation.teachers import Teachers, build_teachers
from lightning_stages.errors import DistillationStepError


class SharedEmbedding(DistillationModule, pl.LightningModule):
    """A student and a teacher that share one embedding module (the README's "one embedding object")."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5))
        self.head = nn.Linear(4, 2)
        self.__dict__["teacher_head"] = nn.Linear(4, 2)
        self.loss_weights = {"ce": 1.0}
        self.seen: list[tuple[bool, bool]] = []

    def configure_teachers(self):
        return {"teacher": nn.Sequential(self.embedding, self.teacher_head)}

    def forward(self, x):
        return self.head(self.embedding(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.embedding.training, self.embedding[0].weight.requires_grad))
        logits = self(x)
        out = self.run_teachers(x)
        distill = {"kd": F.mse_loss(logits, out["teacher"])} if out else {}
        return self.weighted_loss({"ce": F.cross_entropy(logits, y)}, distill)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_the_student_shares_with_a_teacher_keeps_training_with_the_student(tmp_path):
    model = SharedEmbedding()
    before = model.embedding[0].weight.detach().clone()
    schedule = [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True},
                {"name": "ft", "start_epoch": 1, "end_epoch": 2, "distillation": False}]
    trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(stage_schedule=schedule)]).fit(
        model, loader(n=8, batch_size=4))
    assert model.seen and all(seen == (True, True) for seen in model.seen)  # in training mode, with gradients
    assert not torch.equal(model.embedding[0].weight, before)
    assert not model.teacher_head.weight.requires_grad and not model.teacher_head.training  # the teacher's own


def test_freezing_leaves_shared_modules_alone_and_freezes_a_teacher_that_is_a_student_submodule_whole():
    shared, own = nn.Linear(2, 2), nn.Linear(2, 2)
    inner_teacher = nn.Linear(2, 2)
    student = nn.Sequential(shared, inner_teacher)
    teachers = {"partly": nn.Sequential(shared, own), "inside": inner_teacher}
    Teachers(teachers, device=None, student=student)
    assert (shared.weight.requires_grad, shared.training) == (True, True)
    assert (own.weight.requires_grad, own.training) == (False, False)
    assert (inner_teacher.weight.requires_grad, inner_teacher.training) == (False, False)


def test_a_torchscript_teacher_is_frozen_not_a_raw_error():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    Teachers({"t": scripted}, device=None, student=nn.Linear(2, 2))
    assert not scripted.training and not any(p.requires_grad for p in scripted.parameters())


def test_a_teacher_that_contains_the_student_is_refused():
    student = nn.Linear(2, 2)
    with pytest.raises(StageConfigError, match=re.escape("`configure_teachers` = 'Sequential': teacher 'teacher' contains "
                                                         "the student itself")):
        build_teachers(lambda: {"teacher": nn.Sequential(student)}, "stage 0 ('kd')", student)


def test_a_module_dict_is_taken_and_a_lone_module_is_named_by_its_type():
    teachers = build_teachers(lambda: nn.ModuleDict({"t": nn.Linear(1, 1)}), "stage 0")
    assert list(teachers) == ["t"] and isinstance(teachers["t"], nn.Linear)
    with pytest.raises(StageConfigError) as err:
        build_teachers(lambda: nn.Sequential(nn.Linear(1, 1)), "stage 0")
    message = str(err.value)
    assert "`configure_teachers` = 'Sequential': must return a mapping of teacher names to modules, not a Sequential" \
           in message and len(message.splitlines()) == 2, message


class _SharedCached(SharedEmbedding):
    def __init__(self):
        super().__init__()
        self.teacher_cache = TeacherCache()

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self(x)
        out = self.run_teachers(x, sample_index=index)
        return self.weighted_loss({"ce": F.cross_entropy(logits, y)}, {"kd": F.mse_loss(logits, out["teacher"])})


def test_a_teacher_cache_with_a_teacher_sharing_a_trained_module_is_refused(tmp_path):
    data = IndexedDataset(loader(n=8, batch_size=4).dataset)
    fit = trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(
        stage_schedule=[{"name": "kd", "start_epoch": 0, "distillation": True}], verbose=False)])
    with pytest.raises(DistillationStepError, match=re.escape(
            "`teacher_cache` = TeacherCache(in memory, dtype=None, samples=0): is set, but teacher 'teacher' shares a "
            "module the student trains (teacher.0.0.weight)")):
        fit.fit(_SharedCached(), torch.utils.data.DataLoader(data, batch_size=4))


def test_placing_the_teachers_leaves_a_module_the_student_holds_where_the_student_has_it():
    shared, own = nn.Linear(2, 2), nn.Linear(2, 2)
    student, teacher = nn.Sequential(shared), nn.Sequential(shared, own)
    teachers = Teachers({"t": teacher}, device=None, student=student)
    teachers.offloaded = True  # as after an offload; bring them back to a device (meta: no data is copied)
    teachers.place(False, torch.device("meta"))
    assert shared.weight.device.type == "cpu" and own.weight.device.type == "meta"


def test_a_hook_into_a_torchscript_teacher_is_refused_at_setup_not_raw():
    class Scripted(DistillationModule, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)

        def configure_teachers(self):
            return {"teacher": torch.jit.script(nn.Sequential(nn.Linear(2, 2)))}

        def configure_feature_hooks(self):
            return {"student": ["net"], "teacher": ["0"]}

    with pytest.raises(StageConfigError, match=re.escape(
            "`configure_feature_hooks.teacher` = '0': hooks a TorchScript module ('teacher'), which takes no forward "
            "hooks")):
        Scripted().prepare_teachers()


@pytest.mark.parametrize("model", ["teacher", "student"])
def test_a_hook_into_a_torchscript_submodule_is_refused_at_setup_naming_it(model):
    class PartlyScripted(DistillationModule, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.Linear(2, 2)))

        def configure_teachers(self):
            return {"teacher": nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.Linear(2, 2)))}

        def configure_feature_hooks(self):
            return {"student": ["net.1" if model == "student" else "net.0"],
                    "teacher": ["1" if model == "teacher" else "0"]}

    path = "net.1" if model == "student" else "1"
    with pytest.raises(StageConfigError, match=re.escape(
            f"`configure_feature_hooks.{model}` = '{path}': hooks a TorchScript module ('{model}', '{path}'), which "
            "takes no forward hooks")):
        PartlyScripted().prepare_teachers()
