"""The losses' edge inputs: adapters that fail or are keyed by no layer, loss names that
coincide, temperatures at the edge of the float range, and weights that are no numbers. Values are checked against
hand-written references (math.exp/math.log); errors by their text."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_stages.distillation.teachers import prepare
from lightning_stages.errors import DistillationStepError
from lightning_stages.losses import feature_mse, logit_kd, mask_kd, paired_feature_losses, weighted_sum


def test_mask_kd_lets_a_nan_student_through():
    assert math.isnan(mask_kd(torch.tensor([[math.nan, 0.0]]), torch.zeros(1, 2)).item())


class _Asserting(nn.Module):  # an adapter that checks its input with assert
    def forward(self, x):
        assert x.shape[1] == 8, f"{x.shape[1]} channels"
        return x


class _Tuple(nn.Module):  # an adapter returning (features, attention), as nn.MultiheadAttention does
    def forward(self, x):
        return x, None


@pytest.mark.parametrize(("adapter", "error"), [
    (lambda x: x[:, :, 0], "IndexError: too many indices"),
    (nn.Conv2d(8, 3, 1), "RuntimeError: "),
    (_Tuple(), "returned a tuple, not a tensor"),
    (_Asserting(), "AssertionError: 7 channels"),
])
def test_feature_mse_and_paired_feature_losses_name_an_adapter_that_fails(adapter, error):
    student, teacher = torch.zeros(2, 7), torch.zeros(2, 3)
    with pytest.raises(ValueError) as mse_error:
        feature_mse(student, teacher, adapter=adapter, name="encoder.layer3")
    with pytest.raises(ValueError) as paired_error:
        paired_feature_losses({"enc": student}, {"t": teacher}, ["enc"], ["t"], adapters={"enc": adapter})
    for raised, start in ((mse_error, "encoder.layer3: the adapter "), (paired_error, "enc -> teacher.t: the adapter "
                                                                                      "of 'enc' ")):
        message = str(raised.value)
        assert message.startswith(start) and error in message, message
        assert "student features (2, 7) (teacher features (2, 3))" in message, message


def test_paired_feature_losses_refuses_an_adapter_keyed_by_no_student_layer():
    features = {"enc.layer3[0]": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=re.escape("`adapters` = 'enc.layer3': is not a student layer paired with "
                                                   "teacher 'teacher' (['enc.layer3[0]']), so its adapter would never "
                                                   "run; did you mean `enc.layer3[0]`?")):
        paired_feature_losses(features, {"t": torch.zeros(2, 3)}, ["enc.layer3[0]"], ["t"],
                              adapters={"enc.layer3": nn.Linear(3, 3)})


@pytest.mark.parametrize(("layers", "other"), [(["enc.0", "enc[0]"], "enc.0 -> teacher.t"),
                                               (["enc:h", "enc.h"], "enc:h -> teacher.t"),
                                               (["enc", "enc"], "the pair is listed twice")])
def test_paired_feature_losses_refuses_two_pairs_of_one_loss_name(layers, other):
    student = {layers[0]: torch.ones(2, 3), layers[1]: torch.full((2, 3), 2.0)}
    with pytest.raises(ValueError, match=re.escape(other)):
        paired_feature_losses(student, {"t": torch.zeros(2, 3)}, layers, ["t", "t"])


def _two_teacher_hooks(spec):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    teachers = {"a": nn.Sequential(nn.Linear(2, 3)), "b": nn.Sequential(nn.Linear(2, 4))}
    _, hooks = prepare(student, lambda: teachers, lambda: spec, "stage 0")
    hooks.sync(True, {"student": student, **teachers})
    x = torch.randn(5, 2)
    student(x), teachers["a"](x), teachers["b"](x)
    return student, teachers, hooks, x


def test_feature_losses_refuse_an_adapter_no_pair_uses_and_take_one_dict_per_teacher():
    spec = {"student": {"a": ["0"], "b": ["1"]}, "a": ["0"], "b": ["0"]}
    student, teachers, hooks, x = _two_teacher_hooks(spec)
    wide = nn.Linear(3, 4)
    with pytest.raises(DistillationStepError, match=re.escape(
            "`feature_losses.adapters` = '2': is not a student layer paired with a teacher (['0', '1']), so its "
            "adapter would never run")):
        hooks.paired_losses(list(teachers), None, {"1": wide, "2": wide}, F.mse_loss, "kd")
    # one dict for the calls per teacher: teacher a's call leaves the adapter of b's layer alone
    only_a = hooks.paired_losses(list(teachers), "a", {"1": wide}, F.mse_loss, "kd")
    only_b = hooks.paired_losses(list(teachers), "b", {"1": wide}, F.mse_loss, "kd")
    with torch.no_grad():
        h = student[0](x)
        assert only_a["0__a.0"].item() == pytest.approx(((h - teachers["a"](x)) ** 2).mean().item(), rel=1e-6)
        assert only_b["1__b.0"].item() == pytest.approx(
            ((wide(torch.relu(h)) - teachers["b"](x)) ** 2).mean().item(), rel=1e-6)


def test_feature_losses_refuse_pairs_of_two_teachers_with_one_loss_name():
    student = nn.Sequential(nn.Linear(2, 3))
    inner = nn.Module()
    inner.add_module("x", nn.Linear(2, 3))
    t = nn.Module()
    t.add_module("a", inner)
    t.forward = lambda x: t.a.x(x)
    t_a = nn.Sequential()
    t_a.add_module("x", nn.Linear(2, 3))
    teachers = {"t": t, "t.a": t_a}
    spec = {"student": ["0"], "t": ["a.x"], "t.a": ["x"]}  # "0__t.a.x" twice
    _, hooks = prepare(student, lambda: teachers, lambda: spec, "stage 0")
    hooks.sync(True, {"student": student, **teachers})
    x = torch.randn(4, 2)
    student(x), t(x), t_a(x)
    with pytest.raises(DistillationStepError, match=re.escape("`configure_feature_hooks` = '0__t.a.x': gives two layer "
                                                              "pairs of different teachers the same loss name")):
        hooks.paired_losses(list(teachers), None, None, F.mse_loss, "kd")


@pytest.mark.parametrize("temperature", [np.float32(2.0), np.int64(2), np.float64(2.0)])
def test_a_numpy_temperature_is_a_temperature(temperature):
    student, teacher = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[1.0, 0.0, -0.5]])
    s = [v / 2 for v in student[0].tolist()]
    t = [v / 2 for v in teacher[0].tolist()]
    p = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
    q = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
    expected = 4 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert logit_kd(student, teacher, temperature=temperature).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", [logit_kd, mask_kd])
@pytest.mark.parametrize("temperature", [1e155, 10**400, 1e-300])
def test_a_temperature_whose_square_leaves_the_float_range_is_named(loss, temperature):
    with pytest.raises(ValueError, match=re.escape("Expected argument `temperature` to be a positive finite number")):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=temperature)


@pytest.mark.parametrize(("args", "message"), [
    (({"a": torch.tensor(1.0)}, {1: 1.0, "b": 2.0}), "`task_losses` = 'a': has no weight in `loss_weights` (['1', 'b'])"),
    (({"a": torch.tensor(1.0)}, {"a": None}), "`loss_weights` = 'a': a weight must be a number or a tensor, got NoneType"),
    (({"a": torch.tensor(1.0)}, {"a": "0.5"}), "`loss_weights` = 'a': a weight must be a number or a tensor, got str"),
    (({"a": 2.0}, {"a": 1.0}), "`task_losses` = 'a': a loss must be a tensor, got float 2.0"),
    (({"a": torch.tensor(1.0)}, {"a": 1.0}, {"kd": torch.tensor(1.0)}, None),
     "`lambda_coef`: a weight must be a number or a tensor, got NoneType"),
    (({"a": torch.tensor(1.0)}, {"a": 1.0}, [0.5]), "`distill_losses`: a loss must be a tensor, got float"),
])
def test_weighted_sum_names_a_loss_or_weight_of_the_wrong_kind(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        weighted_sum(*args)


def test_weighted_sum_takes_numpy_and_tensor_weights():
    total = weighted_sum({"a": torch.tensor(2.0), "b": torch.tensor(3.0)}, {"a": np.float32(0.5), "b": torch.tensor(2.0)},
                         {"kd": torch.tensor(4.0)}, lambda_coef=np.int64(3))
    assert total.item() == pytest.approx(0.5 * 2 + 2 * 3 + 3 * 4)


def test_logit_kd_gives_a_trainable_teacher_the_closed_form_gradient_next_to_a_class_both_rule_out():
    student = torch.tensor([[0.5, -math.inf, 1.5]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[1.0, -math.inf, -0.5]], dtype=torch.float64, requires_grad=True)  # mutual learning
    logit_kd(student, teacher, temperature=2.0).backward()
    # d/dt_j of T^2 * KL(p || q) = T * p_j * ((log p_j - log q_j) - KL), 0 where p_j = 0
    t, s = [1.0 / 2, -0.5 / 2], [0.5 / 2, 1.5 / 2]
    p = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
    q = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
    kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    expected = [2 * p[0] * (math.log(p[0] / q[0]) - kl), 0.0, 2 * p[1] * (math.log(p[1] / q[1]) - kl)]
    assert teacher.grad[0].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
