"""step_checks: the finite check and its DistillationStepError header, the once-per-stage guard and its zero term."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from lightning_stages import DistillationStepError, StageConfigError
from lightning_stages.distillation.step_checks import StageGuard, check_finite, ddp_needs_every_parameter, named_losses


def test_finite_losses_pass_and_each_non_finite_one_is_named_under_a_step_header():
    check_finite([("kd", torch.tensor(0.5)), ("hint", torch.ones(3))], "distill", 2)
    with pytest.raises(DistillationStepError) as err:
        check_finite([("kd", torch.tensor(math.nan)), ("ok", torch.tensor(1.0)),
                      ("hint", torch.tensor([1.0, math.inf]))], "distill", 2)
    lines = str(err.value).splitlines()
    assert lines[0] == "2 problems at the first step of stage 'distill':"
    assert lines[1].startswith("  - stage 'distill': `distill_losses.kd` = nan: is not finite at epoch 2")
    assert lines[2].startswith("  - stage 'distill': `distill_losses.hint` = 'a tensor with non-finite entries'")
    assert "in the stage schedule" not in str(err.value)
    assert err.value.stage == "distill" and isinstance(err.value, StageConfigError)


def test_step_error_header_without_a_stage_and_after_a_round_trip():
    with pytest.raises(DistillationStepError) as err:
        check_finite([("kd", torch.tensor(math.inf))], None, None)
    assert str(err.value).startswith("1 problem at the first step of training:\n  - the current stage: ")
    again = pickle.loads(pickle.dumps(err.value))  # as a DDP worker sends it back
    assert str(again) == str(err.value) and again.stage is None


def test_named_losses_of_a_mapping_a_sequence_and_one_tensor():
    a, b = torch.tensor(1.0), torch.tensor(2.0)
    assert named_losses({"kd": a, "hint": b}) == [("kd", a), ("hint", b)]
    assert named_losses([a, b]) == [("distill_losses[0]", a), ("distill_losses[1]", b)]
    assert named_losses(a) == [("distill_losses", a)]


def test_guard_sees_each_stage_once_and_forgets_the_unused_parameters_of_the_last():
    guard = StageGuard()
    keys = [("a", True, 1), ("a", True, 1), ("a", True, 1), ("b", False, 1), ("b", False, 1), ("a", True, 1)]
    firsts = []
    for key in keys:
        first = guard.enter(key)
        firsts.append(first)
        if first:
            assert guard.unused == ()
            guard.unused = (torch.zeros(1, requires_grad=True),)
    assert firsts == [True, False, False, True, False, True]


def test_guard_zero_term_keeps_the_value_and_gives_unused_parameters_a_zero_gradient():
    guard = StageGuard()
    used, unused = torch.tensor(3.0, requires_grad=True), torch.ones(2, requires_grad=True)
    guard.enter("stage")
    assert guard.keep(used * 2) is not None and guard.keep(used * 2).item() == 6.0
    guard.unused = (unused,)
    total = guard.keep(used * 2)
    total.backward()
    assert total.item() == 6.0 and used.grad.item() == 2.0
    assert torch.equal(unused.grad, torch.zeros(2))


def test_one_device_needs_no_zero_term():
    assert not ddp_needs_every_parameter(None)
    assert not ddp_needs_every_parameter(object())
