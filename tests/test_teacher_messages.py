"""What the teachers' errors say: a misspelt model in captured_features, a selection that is no tensor, a teacher
checkpoint that weights_only refuses or that holds no tensors; and the README's selector of the hidden states."""

from __future__ import annotations

import argparse
import dataclasses
import re

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_bert
from torch import nn

from lightning_stages import DistillationModule, load_teacher_checkpoint
from lightning_stages.errors import DistillationStepError


@dataclasses.dataclass
class _Out:
    h: torch.Tensor
    n_tokens: int = 0


class _Encoder(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.linear, self.kind = nn.Linear(4, 6), kind

    def forward(self, x):
        h = self.linear(x)
        return _Out(h, 4) if self.kind == "dataclass" else (h, None)


class _Teacher(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.enc, self.head = _Encoder(kind), nn.Linear(6, 3)

    def forward(self, x):
        out = self.enc(x)
        return self.head(out.h if isinstance(out, _Out) else out[0])


class _Student(DistillationModule, pl.LightningModule):
    def __init__(self, teacher: nn.Module, hooks: dict):
        super().__init__()
        self.net, self._hooks = nn.Linear(4, 3), hooks
        self.__dict__["_teacher_module"] = teacher  # not a submodule

    def configure_teachers(self):
        return {"teacher": self.__dict__["_teacher_module"]}

    def configure_feature_hooks(self):
        return self._hooks


def _prepared(teacher: nn.Module, hooks: dict) -> _Student:
    model = _Student(teacher, hooks)
    model.prepare_teachers()
    model.use_distillation = True
    return model


def test_captured_features_of_a_name_that_is_no_model_gets_a_did_you_mean():
    model = _prepared(_Teacher("tuple"), {"teacher": ["enc[0]"]})
    model.run_teachers(torch.randn(2, 4))
    assert list(model.captured_features("teacher")) == ["enc[0]"]
    with pytest.raises(DistillationStepError, match=re.escape("`captured_features.model` = 'techer': is neither "
                                                              "'student' nor a teacher; did you mean `teacher`?")):
        model.captured_features("techer")


@pytest.mark.parametrize(("kind", "path", "offered"), [("dataclass", "enc:n_tokens", "`enc:h`"),
                                                       ("tuple", "enc[1]", "`enc[0]`")])
def test_a_selection_that_is_no_tensor_offers_the_modules_tensors(kind, path, offered):
    model = _prepared(_Teacher(kind), {"teacher": [path]})
    model.run_teachers(torch.randn(2, 4))
    with pytest.raises(DistillationStepError) as err:
        model.captured_features("teacher")
    message = str(err.value)
    assert "not a tensor" in message and f"select a tensor: {offered}" in message, message


def test_a_teacher_selector_that_does_not_fit_is_one_problem_in_feature_losses_not_wrapped_twice():
    model = _prepared(_Teacher("tuple"), {"student": ["net"], "teacher": ["enc:nothing"]})
    model.net(torch.randn(2, 4))
    model.run_teachers(torch.randn(2, 4))
    with pytest.raises(DistillationStepError) as err:
        model.feature_losses()
    message = str(err.value)
    assert message.startswith("1 problem at a step of") and message.count("problem") == 1, message
    assert "`configure_feature_hooks.teacher` = 'enc:nothing': the selector `:nothing` is not an attribute" in message


def test_a_lightning_checkpoint_weights_only_refuses_names_the_global_and_the_way_out(tmp_path):
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": nn.Linear(2, 2).state_dict(), "hyper_parameters": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError) as err:
        load_teacher_checkpoint(nn.Linear(2, 2), path, name="big")
    message = str(err.value)
    assert "argparse.Namespace" in message and message.endswith("if you trust the file, pass weights_only=False")
    assert "\x1b" not in message
    assert load_teacher_checkpoint(nn.Linear(2, 2), path, name="big", weights_only=False) is not None


def test_a_checkpoint_value_that_is_no_tensor_is_named(tmp_path):
    path = tmp_path / "np.pt"
    state = nn.Linear(2, 2).state_dict()
    torch.save({"weight": state["weight"].numpy(), "bias": state["bias"]}, path)
    with pytest.raises(ValueError, match=re.escape("holds values that are no tensors under weight (ndarray)")):
        load_teacher_checkpoint(nn.Linear(2, 2), path, name="big", weights_only=False)


def test_the_readmes_hidden_states_selector_takes_the_models_own_hidden_states():
    teacher = tiny_bert(hidden=32, seed=2)
    model = _prepared(teacher, {"teacher": ["bert:hidden_states[2]"]})
    ids = torch.randint(1, 50, (2, 5))
    model.run_teachers(input_ids=ids, output_hidden_states=True)
    with torch.no_grad():
        expected = teacher.bert(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert torch.equal(model.captured_features("teacher")["bert:hidden_states[2]"], expected)


class _WithExtraState(nn.Module):
    def __init__(self, factor: float = 1.0):
        super().__init__()
        self.lin, self.factor = nn.Linear(2, 2), factor

    def get_extra_state(self):
        return {"factor": self.factor}

    def set_extra_state(self, state):
        self.factor = state["factor"]


def test_a_teacher_checkpoint_with_extra_state_loads_as_torch_loads_it(tmp_path):
    path = tmp_path / "extra.pt"
    torch.save(_WithExtraState(2.0).state_dict(), path)
    loaded = load_teacher_checkpoint(_WithExtraState(), path, name="big", weights_only=False)
    assert loaded.factor == 2.0
