"""teachers: what configure_teachers may return, the cost options, offload decisions, placement and runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_stages import StageConfigError
from lightning_stages.distillation.teachers import Teachers, build_teachers, check_cost_options, wants_offload


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({}, "configure_teachers() returned no teachers"),
        (None, "configure_teachers() returned no teachers"),
        ({"student": nn.Linear(1, 1)}, "teacher names must be strings other than 'student'"),
        ({"t": "weights.ckpt"}, "teacher 't' must be an nn.Module, not str"),
    ],
)
def test_build_refuses_what_is_not_teachers(returned, message):
    with pytest.raises(StageConfigError, match=r"stage 2 \('kd'\).*" + message.replace("(", r"\(").replace(")", r"\)")):
        build_teachers(lambda: returned, "stage 2 ('kd')")


def test_a_lazy_teacher_is_refused_at_setup_and_one_run_once_is_taken():
    # freezing an uninitialized lazy parameter raised torch's raw ValueError when the teachers were prepared
    with pytest.raises(StageConfigError, match=r"`configure_teachers` = 'Sequential': teacher 't' has uninitialized "
                                               r"parameters \(an nn.Lazy\* module\); run it once on an example batch"):
        build_teachers(lambda: {"t": nn.Sequential(nn.LazyLinear(3))}, "stage 0")
    lazy = nn.Sequential(nn.LazyLinear(3))
    lazy(torch.zeros(1, 4))  # a dry run gives it its shapes
    teachers = Teachers(build_teachers(lambda: {"t": lazy}, "stage 0"), device=None)
    assert teachers.modules["t"][0].weight.shape == (3, 4) and not teachers.modules["t"][0].weight.requires_grad


def test_build_names_the_exception_of_configure_teachers():
    def broken():
        raise FileNotFoundError("teacher.ckpt")

    with pytest.raises(StageConfigError, match=r"configure_teachers\(\) raised FileNotFoundError: teacher.ckpt") as err:
        build_teachers(broken, "stage 0")
    assert isinstance(err.value.__cause__, FileNotFoundError)


def test_cost_options_are_checked_together():
    with pytest.raises(StageConfigError) as err:
        check_cost_options("bf16_mixed", "sometimes", object(), "stage 0")
    assert str(err.value).startswith("3 problems")
    assert "did you mean `bf16-mixed`?" in str(err.value)


@pytest.mark.parametrize(
    ("mode", "expected"),  # (distills now, distills later) -> offload?
    [
        (False, {(True, True): False, (True, False): False, (False, True): False, (False, False): False}),
        (True, {(True, True): False, (True, False): False, (False, True): False, (False, False): True}),
        ("after_last", {(True, True): False, (True, False): False, (False, True): False, (False, False): True}),
        ("idle", {(True, True): False, (True, False): False, (False, True): True, (False, False): True}),
    ],
)
def test_offload_decision_per_mode(mode, expected):
    got = {(now, later): wants_offload(mode, now, later, "stage 0") for now, later in expected}
    assert got == expected


def test_unknown_offload_mode_is_refused_with_the_cost_option_message():
    with pytest.raises(StageConfigError, match=r"stage 'kd'.*`offload_teachers` = 'never': is not an offload mode"):
        wants_offload("never", True, False, "stage 'kd'")


def test_teachers_are_frozen_placed_and_follow_dtype_but_not_device_while_offloaded():
    teachers = Teachers({"t": nn.Linear(2, 2)}, device=torch.device("cpu"))
    weight = teachers.modules["t"].weight
    assert not weight.requires_grad and not teachers.modules["t"].training
    teachers.place(True, torch.device("meta"))
    assert teachers.offloaded and weight.device.type == "cpu"
    teachers.follow(lambda t: t.to("meta", torch.float64))
    assert teachers.modules["t"].weight.device.type == "cpu" and teachers.modules["t"].weight.dtype == torch.float64
    out = teachers.run((torch.ones(1, 2, dtype=torch.float64, device="meta"),), {}, None, lambda: torch.device("meta"))
    assert not teachers.offloaded and out["t"].device.type == "meta"  # brought back to run


def test_run_is_without_autograd():
    teachers = Teachers({"t": nn.Linear(2, 1)}, device=None)
    x = torch.ones(3, 2, requires_grad=True)
    out = teachers.run((x,), {}, None, lambda: torch.device("cpu"))["t"]
    assert not out.requires_grad
    with torch.no_grad():
        assert torch.equal(out, teachers.modules["t"](x))
