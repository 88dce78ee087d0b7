"""feature_hooks: the hook spec check, attaching and detaching, and what the hooks captured."""

from __future__ import annotations

import copy
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import loader, trainer
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_stages import DistillationModule, StageConfigError, StageScheduleCallback
from lightning_stages.distillation.feature_hooks import FeatureHooks, check_hook_spec
from lightning_stages.distillation.teachers import prepare
from lightning_stages.errors import DistillationStepError


def models() -> dict[str, nn.Module]:
    return {"student": nn.Sequential(nn.Linear(2, 3), nn.ReLU()), "teacher": nn.Sequential(nn.Linear(2, 4))}


def test_spec_check_collects_every_problem_with_suggestions():
    with pytest.raises(StageConfigError) as err:
        check_hook_spec({"studnet": ["0"], "teacher": ["1", "0"], "student": "2"}, models(), "stage 1 ('kd')")
    message = str(err.value)
    assert message.startswith("3 problems in the stage schedule:")
    assert "`configure_feature_hooks.studnet` = 'studnet': names neither the student nor a teacher; did you mean " \
           "`student`?" in message
    assert "`configure_feature_hooks.teacher` = '1': names no submodule of 'teacher'; closest submodules: `0`" in message
    assert "`configure_feature_hooks.student` = '2': names no submodule of 'student'" in message
    assert message.count("stage 1 ('kd')") == 3


def test_spec_that_is_not_a_mapping_is_refused():
    with pytest.raises(StageConfigError, match="must return a mapping of model name to submodule paths"):
        check_hook_spec(["0"], models(), "stage 0")


def test_hooks_capture_only_while_attached_and_sync_is_idempotent():
    nets = models()
    hooks = FeatureHooks(check_hook_spec({"student": ["0", "1"], "teacher": "0"}, nets, "stage 0"))
    hooks.sync(True, nets)
    hooks.sync(True, nets)
    assert [len(m._forward_hooks) for m in (nets["student"][0], nets["student"][1], nets["teacher"][0])] == [1, 1, 1]
    x = torch.randn(5, 2)
    nets["student"](x)
    nets["teacher"](x)
    assert torch.equal(hooks.captured("student")["1"], torch.relu(hooks.captured("student")["0"]))
    assert hooks.captured("teacher")["0"].shape == (5, 4)
    assert hooks.snapshot(["teacher", "other"]).keys() == {"teacher"}
    hooks.sync(False, nets)
    assert [len(m._forward_hooks) for m in (nets["student"][0], nets["teacher"][0])] == [0, 0]
    assert dict(hooks.captured("student")) == {}


def test_put_fills_only_attached_models_and_copies_store_nothing():
    nets = models()
    hooks = FeatureHooks({"teacher": ("0",)})
    hooks.put({"teacher": {"0": torch.ones(1)}})  # detached: nowhere to put it
    assert dict(hooks.captured("teacher")) == {}
    hooks.sync(True, nets)
    hooks.put({"teacher": {"0": torch.ones(1)}, "student": {"0": torch.ones(1)}})
    assert list(hooks.captured("teacher")) == ["0"] and dict(hooks.captured("student")) == {}
    clone = copy.deepcopy(nets["teacher"])
    clone(torch.zeros(1, 2))
    assert torch.equal(hooks.captured("teacher")["0"], torch.ones(1))  # the copy's hook wrote nothing here


@pytest.mark.parametrize(("spec", "field", "value"), [
    ({"student": None, "teacher": ["0"]}, "configure_feature_hooks.student", "None"),
    ({"student": ["0"], "teacher": 0}, "configure_feature_hooks.teacher", "0"),
    ({"student": {"teacher": None}, "teacher": ["0"]}, "configure_feature_hooks.student.teacher", "None"),
    ({"student": ["0"], "teacher": {"0"}}, "configure_feature_hooks.teacher", "{'0'}"),  # a set: no pairing order
])
def test_an_entry_that_is_not_a_path_or_a_list_of_paths_is_refused_naming_it(spec, field, value):
    with pytest.raises(StageConfigError) as err:
        check_hook_spec(spec, models(), "stage 0")
    assert f"`{field}` = {value}: must be a submodule path or a list of them" in str(err.value)


def two_teachers() -> tuple[dict[str, nn.Module], torch.Tensor]:
    torch.manual_seed(0)
    return {"a": nn.Sequential(nn.Linear(2, 3)), "b": nn.Sequential(nn.Linear(2, 4))}, torch.randn(5, 2)


def test_a_student_layer_paired_with_a_teacher_that_hooks_nothing_is_refused_not_dropped():
    teachers, x = two_teachers()
    student = models()["student"]
    _, hooks = prepare(student, lambda: teachers, lambda: {"student": {"a": ["0"], "b": ["1"]}, "a": ["0"]}, "stage 0")
    hooks.sync(True, {"student": student, **teachers})
    student(x), teachers["a"](x), teachers["b"](x)
    with pytest.raises(DistillationStepError, match=re.escape("layers of teacher 'b' (they are paired in order) but "
                                                              "got 1 (['1']) and 0 ([])")):
        hooks.paired_losses(list(teachers), None, None, F.mse_loss, "kd")


def test_per_teacher_pairs_and_a_shared_student_list_give_the_losses_of_a_hand_computation():
    teachers, x = two_teachers()
    student = models()["student"]
    wide = nn.Linear(3, 4)
    for spec, pairs in [({"student": {"a": ["0"], "b": ["1"]}, "a": ["0"], "b": ["0"]}, {"0__a.0", "1__b.0"}),
                        ({"student": ["0"], "a": ["0"]}, {"0__a.0"})]:  # a shared list pairs with hooked teachers only
        _, hooks = prepare(student, lambda: teachers, lambda spec=spec: spec, "stage 0")
        hooks.sync(True, {"student": student, **teachers})
        student(x), teachers["a"](x), teachers["b"](x)
        losses = hooks.paired_losses(list(teachers), None, {"1": wide} if "1__b.0" in pairs else None, F.mse_loss, "kd")
        with torch.no_grad():
            h = student[0](x)
            expected = {"0__a.0": ((h - teachers["a"](x)) ** 2).mean(),
                        "1__b.0": ((wide(torch.relu(h)) - teachers["b"](x)) ** 2).mean()}
        assert set(losses) == pairs
        for key in pairs:
            assert losses[key].item() == pytest.approx(expected[key].item(), rel=1e-6)
        hooks.sync(False, {"student": student, **teachers})


def test_a_misspelt_teacher_in_feature_losses_gets_a_did_you_mean():
    teachers, _ = two_teachers()
    student = models()["student"]
    _, hooks = prepare(student, lambda: teachers, lambda: {"student": ["0"], "a": ["0"]}, "stage 0")
    with pytest.raises(DistillationStepError, match=re.escape("`feature_losses.teacher` = 'aa': is not a teacher; did "
                                                              "you mean `a`?")):
        hooks.paired_losses(list(teachers), "aa", None, F.mse_loss, "kd")


@pytest.mark.parametrize("teachers_first", [False, True])
def test_a_module_shared_by_the_student_and_two_teachers_keeps_each_models_own_output(teachers_first):
    """Whichever runs first: with the teachers first, the student's forward through the shared module replaced each
    teacher's feature with the student's (a feature loss of 0)."""
    torch.manual_seed(0)
    shared = nn.Linear(2, 3)  # e.g. a tied embedding: one module object in every model
    student, teachers = nn.Sequential(shared, nn.ReLU()), {"a": nn.Sequential(shared), "b": nn.Sequential(shared)}
    run, hooks = prepare(student, lambda: teachers, lambda: {"student": ["0"], "a": ["0"], "b": ["0"]}, "stage 0")
    hooks.sync(True, {"student": student, **teachers})
    xs, xa, xb = torch.randn(5, 2), torch.randn(5, 2), torch.randn(5, 2)
    if not teachers_first:
        student(xs)
    run.run((), {}, None, lambda: torch.device("cpu"), inputs={"a": xa, "b": xb})  # each teacher its own inputs
    if teachers_first:
        student(xs)
    with torch.no_grad():
        expected = {"student": xs @ shared.weight.T + shared.bias, "a": xa @ shared.weight.T + shared.bias,
                    "b": xb @ shared.weight.T + shared.bias}
    for model, value in expected.items():
        torch.testing.assert_close(hooks.captured(model)["0"], value)


class _CheckpointedStudent(DistillationModule, pl.LightningModule):
    """6 features -> stem -> block (hooked ``block.0``; run through ``checkpoint`` with ``reentrant`` unless None) ->
    head; cross-entropy plus the feature loss against the teacher's first layer."""

    def __init__(self, reentrant: bool | None, frozen_block: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.block, self.head = nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2)
        self.block.requires_grad_(not frozen_block)
        self.reentrant, self.frozen_block = reentrant, frozen_block
        self.loss_weights = {"cls": 1.0}

    def configure_teachers(self):
        return {"teacher": nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))}

    def configure_feature_hooks(self):
        return {"student": ["block.0"], "teacher": ["0"]}

    def forward(self, x):
        h = self.stem(x)
        if self.frozen_block:
            with torch.no_grad():
                h = self.block(h)
        elif self.reentrant is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.run_teachers(x)
        return self.weighted_loss({"cls": F.cross_entropy(logits, y)}, self.feature_losses())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("reentrant", "frozen", "warned"), [
    (True, False, True),  # the hooked layer ran under no_grad: its feature loss trains nothing
    (False, False, False),  # non-reentrant checkpointing captures with the gradient
    (None, False, False),
    (None, True, False),  # a frozen block under no_grad: nothing there to train
])
def test_a_student_layer_captured_without_autograd_is_warned_about_once(tmp_path, reentrant, frozen, warned):
    fit = trainer(tmp_path, max_epochs=2,
                  callbacks=[StageScheduleCallback([{"name": "distill", "start_epoch": 0, "distillation": True}])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(_CheckpointedStudent(reentrant, frozen), train_dataloaders=loader())
    about = [str(w.message) for w in caught if "ran without autograd" in str(w.message)]
    assert len(about) == (1 if warned else 0), about
    if warned:
        assert "stage 'distill'" in about[0] and "'block.0'" in about[0] and "use_reentrant=False" in about[0]
