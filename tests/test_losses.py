"""Distillation losses against hand-written references (explicit sums over math.exp/math.log)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import lightning_stages.losses as losses
from lightning_stages.losses import (
    FeatureAdapter,
    feature_mse,
    logit_kd,
    mask_kd,
    paired_feature_losses,
    weighted_sum,
)


def _softmax(row, temperature):
    scaled = [x / temperature for x in row]
    top = max(v for v in scaled if v != -math.inf)
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p, q):
    """KL(p || q) with 0 * log(0 / q) = 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _logit_kd_reference(student, teacher, temperature):
    """T^2 * mean over every (sample, position) of KL(softmax(t / T) || softmax(s / T)) along dim 1."""
    s = student.movedim(1, -1).reshape(-1, student.shape[1]).tolist()
    t = teacher.movedim(1, -1).reshape(-1, teacher.shape[1]).tolist()
    kls = [_kl(_softmax(tr, temperature), _softmax(sr, temperature)) for sr, tr in zip(s, t)]
    return temperature**2 * sum(kls) / len(kls)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _mask_kd_reference(student, teacher, temperature):
    total = 0.0
    values = list(zip(student.flatten().tolist(), teacher.flatten().tolist()))
    for s, t in values:
        p, q = _sigmoid(t / temperature), _sigmoid(s / temperature)
        total += -(p * math.log(q) + (1 - p) * math.log(1 - q))
    return temperature**2 * total / len(values)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5, 0.5])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 6), (2, 4, 3, 3)])
def test_logit_kd_matches_the_hand_formula(temperature, shape):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    got = logit_kd(student, teacher, temperature=temperature)
    assert got.shape == ()
    assert float(got) == pytest.approx(_logit_kd_reference(student, teacher, temperature), rel=1e-9)


def test_logit_kd_over_token_logits_takes_the_vocabulary_dimension():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 7, 11), torch.randn(2, 7, 11)  # (N, L, V): a causal LM's logits
    # the reference: one row per token, torch's own KL divergence, averaged over the 14 tokens
    flat_s, flat_t = F.log_softmax(student.reshape(14, 11) / 3.0, 1), F.log_softmax(teacher.reshape(14, 11) / 3.0, 1)
    expected = F.kl_div(flat_s, flat_t, log_target=True, reduction="batchmean") * 9.0
    assert logit_kd(student, teacher, temperature=3.0, dim=-1).item() == pytest.approx(expected.item(), rel=1e-5)
    assert logit_kd(student, teacher, temperature=3.0, dim=2).item() == pytest.approx(expected.item(), rel=1e-5)
    assert logit_kd(student, teacher, temperature=3.0).item() != pytest.approx(expected.item(), rel=1e-3)  # dim 1: L
    for dim in (3, -4, 1.0, True):
        with pytest.raises(ValueError, match=re.escape(f"Expected argument `dim` to be a dimension of the (2, 7, 11) "
                                                       f"logits but got {dim!r}")):
            logit_kd(student, teacher, dim=dim)


def test_logit_kd_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, 3.0]])
    assert float(logit_kd(logits, logits.clone(), temperature=3.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(logit_kd(logits, logits.flip(1))) > 0


def test_logit_kd_with_a_class_masked_in_both_models_gives_no_nan():
    student = torch.tensor([[0.0, 1.0, -math.inf]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0, -math.inf]], dtype=torch.float64)
    loss = logit_kd(student, teacher, temperature=2.0)
    loss.backward()
    p = torch.softmax(teacher[:, :2] / 2, dim=1)  # the reference over the two classes that are not masked
    expected = 4 * float((p * (torch.log_softmax(teacher[:, :2] / 2, 1) - torch.log_softmax(student[:, :2] / 2, 1))).sum())
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert torch.isfinite(student.grad[:, :2]).all()


@pytest.mark.parametrize("transpose", [True, False])
def test_logit_kd_masks_exactly_the_classes_of_teacher_probability_zero(transpose, monkeypatch):
    # every mix of a finite, -inf and NaN logit on either side, next to finite classes: the loss and the gradient are
    # those of the formula with an explicit where (written here), NaN where the teacher is NaN, never 0 * -inf
    monkeypatch.setattr(losses, "_on_transpose", lambda logits, classes: transpose)
    values = [0.5, -math.inf, math.nan, 3.0]
    pairs = [(s, t) for s in values for t in values]
    student = torch.tensor([[s, 1.0, -2.0] for s, _ in pairs], dtype=torch.float64)
    teacher = torch.tensor([[t, 0.0, 1.0] for _, t in pairs], dtype=torch.float64)
    for row in range(len(pairs)):
        s_row = student[row:row + 1].clone().requires_grad_(True)
        t_row = teacher[row:row + 1]
        loss = logit_kd(s_row, t_row, temperature=2.0)
        (grad,) = torch.autograd.grad(loss, s_row)
        s_ref = s_row.detach().clone().requires_grad_(True)
        log_p_s, log_p_t = torch.log_softmax(s_ref / 2.0, dim=1), torch.log_softmax(t_row / 2.0, dim=1)
        p_t = log_p_t.exp()
        expected = torch.where(p_t == 0, 0.0, p_t * (log_p_t - log_p_s)).sum() * 4.0
        (expected_grad,) = torch.autograd.grad(expected, s_ref)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0, equal_nan=True, msg=str(pairs[row]))
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15, equal_nan=True, msg=str(pairs[row]))
    masked = logit_kd(torch.tensor([[0.0, -math.inf]]), torch.tensor([[1.0, -math.inf]]))
    assert float(masked) == 0.0  # both masked: the class adds 0, not NaN


def test_weighted_sum_never_returns_the_callers_own_tensor():
    ce = torch.tensor(2.0)
    total = weighted_sum({"ce": ce}, {"ce": 1.0})
    assert total is not ce and float(total) == 2.0
    kd = torch.tensor(3.0)
    assert weighted_sum({}, {}, kd, lambda_coef=1.0) is not kd


def test_logit_kd_with_zero_teacher_probability_gives_no_nan():
    student = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, -math.inf]], dtype=torch.float64)
    loss = logit_kd(student, teacher, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(_logit_kd_reference(student.detach(), teacher, 2.0), rel=1e-9)
    assert torch.isfinite(student.grad).all()


def test_logit_kd_with_extreme_logits_stays_finite():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, 1000.0]])
    # teacher is one-hot on class 1, student uniform: KL = log 2
    assert float(logit_kd(student, teacher)) == pytest.approx(math.log(2), rel=1e-6)
    assert torch.isfinite(logit_kd(teacher, student))


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(("shape", "dim"), [((6, 4), 1), ((6, 4), -1), ((2, 3, 5), -1), ((2, 4, 3), 1), ((5, 3), 0)])
def test_logit_kd_gradient_is_the_closed_form(temperature, shape, dim, transpose, monkeypatch):
    """d/ds of T^2 * mean KL = T * (softmax(s/T) - softmax(t/T)) / positions, along the class dimension: the
    classes-last layouts (computed on a transpose or not, whichever this CPU takes) and the others alike, contiguous
    or not."""
    monkeypatch.setattr(losses, "_on_transpose", lambda logits, classes: transpose)
    gen = torch.Generator().manual_seed(3)
    for student0 in (torch.randn(shape, generator=gen, dtype=torch.float64) * 2,
                     torch.randn(shape[::-1], generator=gen, dtype=torch.float64).permute(*range(len(shape))[::-1])):
        teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
        student = student0.clone().requires_grad_()
        logit_kd(student, teacher, temperature=temperature, dim=dim).backward()
        positions = student.numel() // shape[dim]
        p_s = torch.softmax(student0.detach() / temperature, dim=dim)
        p_t = torch.softmax(teacher / temperature, dim=dim)
        torch.testing.assert_close(student.grad, temperature * (p_s - p_t) / positions, rtol=1e-9, atol=1e-12)
        assert float(logit_kd(student0, teacher, temperature, dim=dim)) == pytest.approx(
            _logit_kd_reference(student0.movedim(dim, 1), teacher.movedim(dim, 1), temperature), rel=1e-9)


def test_logit_kd_takes_the_transpose_only_for_few_classes_on_an_avx512_cpu(monkeypatch):
    """The transposed softmax pays only on an AVX-512 CPU for a few classes; elsewhere (an AVX2 CPU, 1000 classes,
    token logits of a vocabulary, any other device) it copies the logits and costs more."""
    dims: list[int] = []
    log_softmax = F.log_softmax
    monkeypatch.setattr(F, "log_softmax", lambda x, dim: dims.append(dim) or log_softmax(x, dim=dim))
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    for avx512, classes_dim in ((True, 0), (False, 1)):
        monkeypatch.setattr(losses, "_avx512", lambda avx512=avx512: avx512)
        dims.clear()
        logit_kd(student, teacher, temperature=2.0)
        assert dims == [classes_dim, classes_dim]
    monkeypatch.setattr(losses, "_avx512", lambda: True)
    assert losses._on_transpose(torch.zeros(4, 16), 16)
    assert not losses._on_transpose(torch.zeros(4, 17), 17)
    assert not losses._on_transpose(torch.zeros(4, 0), 0)  # no classes: nothing to reshape into (classes, positions)
    assert not losses._on_transpose(torch.zeros(4, 10, device="meta"), 10)


@pytest.mark.parametrize("avx512", [True, False])
def test_logit_kd_of_no_classes_is_zero_along_either_dimension(avx512, monkeypatch):
    """No classes: the KL at each of the 4 positions is a sum over nothing, 0; whichever dimension holds them."""
    monkeypatch.setattr(losses, "_avx512", lambda: avx512)
    for shape, dim in (((4, 0), -1), ((4, 0), 1), ((4, 0, 3), 1)):
        assert float(logit_kd(torch.zeros(shape), torch.zeros(shape), temperature=2.0, dim=dim)) == 0.0


def test_logit_kd_of_no_logits_is_nan_as_a_mean_of_nothing():
    assert math.isnan(float(logit_kd(torch.zeros(0, 5), torch.zeros(0, 5))))
    assert math.isnan(float(logit_kd(torch.zeros(0, 5), torch.zeros(0, 5), dim=-1, temperature=2.0)))


def test_logit_kd_gradient_reaches_the_student_only():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4)
    logit_kd(student, teacher, temperature=2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("shape", [(6,), (2, 1, 4, 4), (3, 5)])
def test_mask_kd_matches_the_hand_formula(temperature, shape):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(shape, generator=gen, dtype=torch.float64) * 4
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * 4
    got = mask_kd(student, teacher, temperature=temperature)
    assert float(got) == pytest.approx(_mask_kd_reference(student, teacher, temperature), rel=1e-9)


def test_mask_kd_with_certain_teacher_gives_no_nan():
    student = torch.tensor([2.0, -3.0, 0.0, 50.0], requires_grad=True)
    teacher = torch.tensor([math.inf, -math.inf, math.inf, -math.inf])
    loss = mask_kd(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # targets 1, 0, 1, 0: -log sigmoid(2), -log(1 - sigmoid(-3)), -log sigmoid(0), -log(1 - sigmoid(50))
    expected = (
        -math.log(_sigmoid(2.0)) - math.log(1 - _sigmoid(-3.0)) - math.log(0.5) + (50 + math.log1p(math.exp(-50)))
    ) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", [logit_kd, mask_kd])
@pytest.mark.parametrize("temperature", [0, -1.0, math.nan, math.inf, True, "2"])
def test_bad_temperature_is_named(loss, temperature):
    with pytest.raises(ValueError, match=re.escape(f"`temperature` to be a positive finite number but got {temperature!r}")):
        loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=temperature)


@pytest.mark.parametrize("loss", [logit_kd, mask_kd])
def test_logit_shape_mismatch_names_the_pair_and_both_shapes(loss):
    with pytest.raises(ValueError, match=re.escape("head.cls: student shape (2, 3) does not match teacher shape (2, 4)")):
        loss(torch.zeros(2, 3), torch.zeros(2, 4), name="head.cls")


@pytest.mark.parametrize(
    ("shape", "reference"),
    [
        ((4, 3), lambda x, w, b: x @ w.T + b),
        ((2, 3, 7), lambda x, w, b: F.conv1d(x, w[:, :, None], b)),
        ((2, 3, 5, 6), lambda x, w, b: F.conv2d(x, w[:, :, None, None], b)),
    ],
)
def test_feature_adapter_is_a_1x1_projection_of_the_channels(shape, reference):
    torch.manual_seed(0)
    adapter = FeatureAdapter(3, 8)
    x = torch.randn(shape)
    out = adapter(x)
    assert out.shape == (shape[0], 8, *shape[2:])
    weight, bias = adapter.proj.weight, adapter.proj.bias
    torch.testing.assert_close(out, reference(x, weight, bias))


def test_feature_adapter_5d_shape():
    assert FeatureAdapter(2, 5)(torch.zeros(1, 2, 3, 4, 6)).shape == (1, 5, 3, 4, 6)


def test_feature_mse_matches_the_hand_formula():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    expected = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    assert float(feature_mse(a, b)) == pytest.approx(expected, rel=1e-12)


def test_feature_mse_with_adapter_trains_the_adapter():
    torch.manual_seed(0)
    adapter = FeatureAdapter(4, 6)
    student = torch.randn(2, 4, 3, 3)
    teacher = torch.randn(2, 6, 3, 3)
    loss = feature_mse(student, teacher, adapter=adapter)
    projected = F.conv2d(student, adapter.proj.weight[:, :, None, None], adapter.proj.bias)
    assert loss.item() == pytest.approx(((projected - teacher) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0


def test_feature_mse_shape_mismatch_names_the_layer_and_both_shapes():
    with pytest.raises(ValueError, match=re.escape("encoder.layer3: student features (2, 8, 4, 4) do not match "
                                                   "teacher features (2, 16, 4, 4)")) as info:
        feature_mse(torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 4, 4), name="encoder.layer3")
    assert "FeatureAdapter(student_channels, teacher_channels)" in str(info.value)


def test_feature_mse_mismatch_after_the_adapter_names_the_adapted_shape():
    adapter = FeatureAdapter(8, 12)
    with pytest.raises(ValueError, match=re.escape("neck: student features (2, 12, 4, 4) do not match teacher "
                                                   "features (2, 16, 4, 4) after the adapter")) as info:
        feature_mse(torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 4, 4), adapter=adapter, name="neck")
    assert "pass" not in str(info.value)  # the adapter is there: no advice to add one


def test_a_token_length_mismatch_after_the_adapter_still_says_pool_or_interpolate():
    adapter = FeatureAdapter(8, 32, channels_last=True)  # (N, L, C) tokens: 5 against the teacher's 17
    with pytest.raises(ValueError, match=re.escape("student features (2, 5, 32) do not match teacher features "
                                                   "(2, 17, 32) after the adapter")) as info:
        feature_mse(torch.zeros(2, 5, 8), torch.zeros(2, 17, 32), adapter=adapter, name="tokens")
    assert "pool or interpolate" in str(info.value) and "pass" not in str(info.value)


def test_logit_kd_and_mask_kd_of_a_bfloat16_teacher_compute_in_float32():
    # teacher_precision="bf16-mixed" hands over bfloat16 logits: the KL was computed in bfloat16, and went below 0
    g = torch.Generator().manual_seed(0)
    teacher = (torch.randn(4, 16, 1000, generator=g) * 3).bfloat16()
    student = teacher.float() + 0.05 * torch.randn(4, 16, 1000, generator=g)
    s64, t64 = student.double() / 2.0, teacher.double() / 2.0
    reference = (F.softmax(t64, -1) * (F.log_softmax(t64, -1) - F.log_softmax(s64, -1))).sum(-1).mean() * 4.0
    got = logit_kd(student, teacher, temperature=2.0, dim=-1)
    assert got.dtype == torch.float32 and float(got) == pytest.approx(float(reference), rel=1e-4)
    both = logit_kd(student.bfloat16(), teacher, temperature=2.0, dim=-1)  # both 16-bit: float32 too
    assert both.dtype == torch.float32 and float(both) >= 0
    mask = mask_kd(student[..., :4], teacher[..., :4], temperature=2.0)
    mask_reference = F.binary_cross_entropy_with_logits(s64[..., :4], torch.sigmoid(t64[..., :4])) * 4.0
    assert mask.dtype == torch.float32 and float(mask) == pytest.approx(float(mask_reference), rel=1e-5)


def test_logit_kd_lets_a_nan_teacher_through_so_it_can_be_caught():
    teacher = torch.tensor([[float("nan"), 0.0, 1.0]])
    assert torch.isnan(logit_kd(torch.zeros(1, 3), teacher))


# ---------------------------------------------------------------------------------------------- weighted_sum


def test_weighted_sum_matches_the_hand_formula():
    task = {"bce": torch.tensor(1.5), "dice": torch.tensor(0.25), "cls": torch.tensor(4.0)}
    weights = {"bce": 2.0, "dice": 0.5, "cls": 0.1, "unused": 100.0}
    distill = {"kd": torch.tensor(0.2), "hint": torch.tensor(0.7)}
    expected = 2.0 * 1.5 + 0.5 * 0.25 + 0.1 * 4.0 + 0.3 * (0.2 + 0.7)
    assert weighted_sum(task, weights, distill, lambda_coef=0.3).item() == pytest.approx(expected, rel=1e-6)
    # the distillation losses as a sequence or one tensor give the same sum; none gives the task part alone
    assert weighted_sum(task, weights, list(distill.values()), 0.3).item() == pytest.approx(expected, rel=1e-6)
    assert weighted_sum(task, weights, torch.tensor(0.9), 0.3).item() == pytest.approx(expected, rel=1e-6)
    assert weighted_sum(task, weights).item() == pytest.approx(2.0 * 1.5 + 0.5 * 0.25 + 0.1 * 4.0, rel=1e-6)
    assert weighted_sum(task, weights, {}, 0.3).item() == pytest.approx(2.0 * 1.5 + 0.5 * 0.25 + 0.1 * 4.0, rel=1e-6)


def test_weighted_sum_of_distillation_losses_alone_and_its_gradient():
    kd = torch.tensor(2.0, requires_grad=True)
    total = weighted_sum({}, {}, [kd], lambda_coef=0.25)
    assert total.item() == pytest.approx(0.5)
    total.backward()
    assert kd.grad.item() == pytest.approx(0.25)  # d(lambda * kd) / d kd = lambda


@pytest.mark.parametrize(
    ("task", "weights", "message"),
    [
        ({"foacl": torch.tensor(1.0)}, {"focal": 1.0, "bce": 1.0},
         "`task_losses` = 'foacl': has no weight in `loss_weights` (['bce', 'focal']); did you mean `focal`?"),
        ({"zzz": torch.tensor(1.0)}, {"bce": 1.0}, "`task_losses` = 'zzz': has no weight in `loss_weights` (['bce'])"),
        ({}, {"bce": 1.0}, "`task_losses` = {}: no losses to weight"),
    ],
)
def test_weighted_sum_refuses_losses_without_weight_and_no_losses(task, weights, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        weighted_sum(task, weights)


# ---------------------------------------------------------------------------------------------- paired_feature_losses


def test_paired_feature_losses_pairs_in_order_through_the_adapters_and_matches_the_hand_formula():
    gen = torch.Generator().manual_seed(3)
    student = {"enc.1": torch.randn(2, 3, generator=gen, dtype=torch.float64),
               "enc.2": torch.randn(2, 4, generator=gen, dtype=torch.float64)}
    teacher = {"layer1": torch.randn(2, 3, generator=gen, dtype=torch.float64),
               "layer2": torch.randn(2, 4, generator=gen, dtype=torch.float64)}
    double = lambda t: 2 * t  # noqa: E731 - an adapter is any callable
    got = paired_feature_losses(student, teacher, ["enc.1", "enc.2"], ["layer1", "layer2"],
                                adapters={"enc.2": double}, teacher="big")
    assert list(got) == ["enc.1__big.layer1", "enc.2__big.layer2"]

    def mse(a, b):
        pairs = list(zip(a.flatten().tolist(), b.flatten().tolist()))
        return sum((x - y) ** 2 for x, y in pairs) / len(pairs)

    assert got["enc.1__big.layer1"].item() == pytest.approx(mse(student["enc.1"], teacher["layer1"]), rel=1e-12)
    assert got["enc.2__big.layer2"].item() == pytest.approx(mse(2 * student["enc.2"], teacher["layer2"]), rel=1e-12)


def test_paired_feature_losses_uses_the_given_loss_function():
    got = paired_feature_losses({"a": torch.tensor([[1.0, -2.0]])}, {"b": torch.tensor([[0.0, 0.0]])}, ["a"], ["b"],
                                loss_fn=F.l1_loss)
    assert got == {"a__teacher.b": pytest.approx(torch.tensor((1.0 + 2.0) / 2))}


def test_paired_feature_losses_and_feature_mse_say_the_same_about_shapes():
    student, teacher = torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 4, 4)
    with pytest.raises(ValueError) as single:
        feature_mse(student, teacher, name="neck -> teacher.layer4")
    with pytest.raises(ValueError) as paired:
        paired_feature_losses({"neck": student}, {"layer4": teacher}, ["neck"], ["layer4"])
    shape_part = "neck -> teacher.layer4: student features (2, 8, 4, 4) do not match teacher features (2, 16, 4, 4)"
    assert str(single.value).startswith(shape_part) and str(paired.value).startswith(shape_part)
    assert "adapters={'neck': FeatureAdapter(student_channels, teacher_channels)}" in str(paired.value)
    adapted = "neck -> teacher.layer4: student features (2, 12, 4, 4) do not match teacher features (2, 16, 4, 4)"
    with pytest.raises(ValueError, match=re.escape(adapted + " after the adapter")):
        paired_feature_losses({"neck": student}, {"layer4": teacher}, ["neck"], ["layer4"],
                              adapters={"neck": FeatureAdapter(8, 12)})


@pytest.mark.parametrize(
    ("student_layers", "teacher_layers", "message"),
    [
        (["a"], ["b", "c"], "as many student layers as layers of teacher 'teacher' (they are paired in order) but got "
                            "1 (['a']) and 2 (['b', 'c'])"),
        (["x"], ["b"], "x -> teacher.b: the student layer 'x' captured nothing"),
        (["a"], ["y"], "a -> teacher.y: the teacher layer 'y' captured nothing"),
    ],
)
def test_paired_feature_losses_names_what_does_not_pair(student_layers, teacher_layers, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        paired_feature_losses({"a": torch.zeros(1, 2)}, {"b": torch.zeros(1, 2), "c": torch.zeros(1, 2)},
                              student_layers, teacher_layers)


@pytest.mark.parametrize(("student", "teacher"), [((2, 4, 4, 16), (2, 4, 4, 32)), ((2, 16, 4, 4), (2, 16, 4, 8))])
def test_a_mismatch_in_the_last_of_four_dimensions_is_not_called_only_spatial(student, teacher):
    # (N, H, W, C) features whose channels differ, or (N, C, H, W) ones whose width differs: the shapes cannot tell
    with pytest.raises(ValueError) as err:
        paired_feature_losses({"s": torch.zeros(student)}, {"t": torch.zeros(teacher)}, ["s"], ["t"])
    message = str(err.value)
    assert "only the spatial size differs" not in message
    assert "the last dimension differs: for channels-last features the channels, pass `adapters={'s': " \
           "FeatureAdapter(student_channels, teacher_channels, channels_last=True)}`; else pool or interpolate" in message
