"""Functional distillation losses, the learned 1x1 adapter that maps student features to the teacher's, and the
functions that pair hooked features and weight losses (the math behind ``DistillationModule``). The feature part
lives in :mod:`lightning_stages.feature_pairs` and is exported here."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_stages.errors import did_you_mean
from lightning_stages.feature_pairs import FeatureAdapter, feature_mse, feature_pair_name, paired_feature_losses

__all__ = ["FeatureAdapter", "feature_mse", "feature_pair_name", "logit_kd", "mask_kd", "paired_feature_losses", "weighted_sum"]


def _number(value: Any) -> bool:
    """A real number, numpy's included, that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_temperature(temperature: Any) -> float:
    """``temperature`` as a float, if a positive number whose square is a positive finite float (``T^2`` scales
    the loss), else a ``ValueError`` naming it."""
    try:
        value = float(temperature) if _number(temperature) else math.nan
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not (value > 0 and 0 < value * value < math.inf):
        square = " (and its square, the loss's factor, a positive finite float)" if 0 < value < math.inf else ""
        raise ValueError(f"Expected argument `temperature` to be a positive finite number{square} but got "
                         f"{temperature!r}")
    return value


def _check_shapes(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student shape {tuple(student.shape)} does not match teacher shape "
                         f"{tuple(teacher.shape)}")


def _float_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Both in their common floating dtype, at least float32 (a bfloat16 teacher's KL is not rounded below 0)."""
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    if not dtype.is_floating_point or dtype.itemsize < 4:
        dtype = torch.float32
    return (student, teacher) if student.dtype == teacher.dtype == dtype else (student.to(dtype), teacher.to(dtype))


@functools.lru_cache(maxsize=1)
def _avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _on_transpose(logits: Tensor, classes: int) -> bool:
    """Whether classes-last logits take their softmaxes over dim 0 of the ``(classes, positions)`` transpose: only on
    an AVX-512 CPU for at most 16 classes, where the last dimension's kernels cost 10x more (40 against 3 us forward
    for 256 x 10). Elsewhere it costs more: the softmaxes copy it contiguous (two more logits-sized tensors); on an
    AVX2 CPU 0.06-0.11 ms more per 256 x 10 step, twice the time for 1000 classes or (4, 128, 32000) token logits."""
    return logits.device.type == "cpu" and 0 < classes <= 16 and _avx512()


def logit_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, name: str = "logit_kd",
             dim: int = 1) -> Tensor:
    """Hinton's knowledge distillation: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, batch mean.

    Args:
        student_logits: ``(N, C, ...)`` class logits of the student; the class dimension is ``dim``.
        teacher_logits: logits of the teacher, same shape.
        temperature: softening temperature ``T > 0``; the ``T^2`` factor keeps gradient scale independent of ``T``.
        name: named in the error when the shapes differ.
        dim: the class dimension (1: ``(N, C)`` or ``(N, C, H, W)``). Token logits ``(N, L, V)``, e.g. a
            HuggingFace causal LM's, take ``dim=-1``; the mean is then over every token.

    Example::

        >>> s = torch.tensor([[1.0, 2.0, 3.0]])
        >>> float(logit_kd(s, s))
        0.0
        >>> round(float(logit_kd(torch.zeros(1, 2), torch.tensor([[0.0, 100.0]]))), 4)
        0.6931
    """
    temperature = _check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits, name)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -student_logits.dim() <= dim < student_logits.dim():
        raise ValueError(f"Expected argument `dim` to be a dimension of the {tuple(student_logits.shape)} logits but "
                         f"got {dim!r}")
    dim %= student_logits.dim()
    classes = student_logits.shape[dim]
    positions = student_logits.numel() // classes if classes else 0  # the mean is over these
    student, teacher = _float_pair(student_logits, teacher_logits)
    if dim == student.dim() - 1 and student.dim() > 1 and _on_transpose(student, classes):
        student, teacher, dim = student.reshape(-1, classes).t(), teacher.reshape(-1, classes).t(), 0
    if temperature != 1:
        student, teacher = student / temperature, teacher / temperature
    log_p_student = F.log_softmax(student, dim=dim)
    log_p_teacher = F.log_softmax(teacher, dim=dim)
    p_teacher = log_p_teacher.exp()
    # classes the teacher gives probability 0 (a logit of -inf) add 0, not 0 * -inf = NaN as in F.kl_div; a NaN from
    # a broken teacher still comes through (masked_fill: the values and gradient of a where, two operations fewer).
    # The difference is masked, not the product: a trainable teacher (mutual learning) then gets no NaN gradient
    terms = p_teacher * (log_p_teacher - log_p_student).masked_fill(p_teacher == 0, 0.0)
    if not positions:  # no logits: the mean of nothing, NaN, as before
        return terms.sum(dim=dim).mean() * (temperature**2)
    return terms.sum() * (temperature**2 / positions)  # the sum over classes, averaged over positions


def mask_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, name: str = "mask_kd") -> Tensor:
    """Binary mask distillation: BCE of the student's mask logits against the teacher's probabilities.

    ``BCE(sigmoid(student/T), sigmoid(teacher/T)) * T^2``, averaged over all pixels.

    Example::

        >>> t = torch.tensor([[0.0, 0.0]])
        >>> round(float(mask_kd(t, t)), 4)  # ln 2: both at p = 0.5
        0.6931
    """
    temperature = _check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits, name)
    student, teacher = _float_pair(student_logits, teacher_logits)
    # a student logit of +-inf gives NaN (-inf * 0 in the BCE), as in torch: mask such pixels out before (handling
    # them here would cost a pass over the logits, forward and backward, at every step)
    return F.binary_cross_entropy_with_logits(student / temperature, torch.sigmoid(teacher / temperature)) * (
        temperature**2)


def weighted_sum(task_losses: Mapping[str, Tensor], loss_weights: Mapping[str, float],
                 distill_losses: Union[Mapping[str, Tensor], Sequence[Tensor], Tensor, None] = None,
                 lambda_coef: float = 1.0) -> Tensor:
    """``sum_k loss_weights[k] * task_losses[k] + lambda_coef * sum(distill_losses)``.

    Args:
        task_losses: ``{loss name: value}``; every name must be a key of ``loss_weights``.
        loss_weights: ``{loss name: weight}``; weights of losses not in ``task_losses`` are not used.
        distill_losses: distillation losses (mapping, sequence or one tensor); ``None`` or empty adds nothing.
        lambda_coef: the factor of the distillation sum.

    Raises:
        ValueError: a task loss has no weight (with the closest weight name), a loss is not a tensor, a weight or
            ``lambda_coef`` is not a number or a tensor, or there is no loss at all.

    Example::

        >>> task = {"bce": torch.tensor(2.0), "dice": torch.tensor(2.0)}
        >>> float(weighted_sum(task, {"bce": 1.0, "dice": 0.5}, {"kd": torch.tensor(4.0)}, lambda_coef=0.5))
        5.0
        >>> weighted_sum({"dcie": torch.tensor(1.0)}, {"dice": 1.0})
        Traceback (most recent call last):
        ...
        ValueError: `task_losses` = 'dcie': has no weight in `loss_weights` (['dice']); did you mean `dice`?
    """
    total: Optional[Tensor] = None
    for key, loss in task_losses.items():
        if key not in loss_weights:
            names = [str(name) for name in loss_weights]
            hint = did_you_mean(str(key), names) or "declare it in `loss_weights`"
            raise ValueError(f"`task_losses` = {key!r}: has no weight in `loss_weights` ({sorted(names)}); {hint}")
        weight = loss_weights[key]
        _check_term(loss, f"`task_losses` = {key!r}", "a loss")
        _check_term(weight, f"`loss_weights` = {key!r}", "a weight")
        # 1 * loss is loss: no operation and no backward node (a tensor weight is never compared: no host sync)
        term = loss if isinstance(weight, (int, float)) and weight == 1 else weight * loss
        total = term if total is None else total + term
    values: list[Tensor] = []
    if distill_losses is not None:
        values = [distill_losses] if isinstance(distill_losses, Tensor) else (
            list(distill_losses.values()) if isinstance(distill_losses, Mapping) else list(distill_losses))
        for value in values:
            _check_term(value, "`distill_losses`", "a loss")
        if values:
            _check_term(lambda_coef, "`lambda_coef`", "a weight")
            distill = sum(values[1:], values[0])
            term = distill if isinstance(lambda_coef, (int, float)) and lambda_coef == 1 else lambda_coef * distill
            total = term if total is None else total + term
    if total is None:
        raise ValueError(f"`task_losses` = {dict(task_losses)!r}: no losses to weight (and no distillation losses)")
    if any(total is loss for loss in [*task_losses.values(), *values]):  # one term of weight 1: never hand back the caller's own tensor
        total = total * 1
    return total


def _check_term(value: Any, where: str, what: str) -> None:
    """A loss must be a tensor; a weight a real number (not a bool) or a tensor."""
    if isinstance(value, Tensor) or (what == "a weight" and _number(value)):
        return
    expected = "a tensor" if what == "a loss" else "a number or a tensor"
    raise ValueError(f"{where}: {what} must be {expected}, got {type(value).__name__} {value!r:.80}")
