"""feature_hooks: the hook spec check, attaching and detaching, and what the hooks captured."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_stages import StageConfigError
from lightning_stages.distillation.feature_hooks import FeatureHooks, check_hook_spec


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
