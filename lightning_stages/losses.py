"""Functional distillation losses, and the learned 1x1 adapter that maps student features to the teacher's."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureAdapter", "feature_mse", "logit_kd", "mask_kd"]


def _check_temperature(temperature: float) -> None:
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or not temperature > 0
    ):
        raise ValueError(f"Expected argument `temperature` to be a positive finite number but got {temperature!r}")


def _check_shapes(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student shape {tuple(student.shape)} does not match teacher shape {tuple(teacher.shape)}"
        )


def logit_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, name: str = "logit_kd") -> Tensor:
    """Hinton's knowledge distillation: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, batch mean.

    Args:
        student_logits: ``(N, C, ...)`` class logits of the student; the class dimension is 1.
        teacher_logits: logits of the teacher, same shape.
        temperature: softening temperature ``T > 0``; the ``T^2`` factor keeps gradient scale independent of ``T``.
        name: named in the error when the shapes differ.

    Example::

        >>> s = torch.tensor([[1.0, 2.0, 3.0]])
        >>> float(logit_kd(s, s))
        0.0
        >>> round(float(logit_kd(torch.zeros(1, 2), torch.tensor([[0.0, 100.0]]))), 4)
        0.6931
    """
    _check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits, name)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    p_teacher = log_p_teacher.exp()
    # classes the teacher gives probability 0 (a logit of -inf) add 0, not 0 * -inf = NaN as in F.kl_div;
    # a NaN from a broken teacher still comes through
    terms = torch.where(p_teacher == 0, torch.zeros_like(p_teacher), p_teacher * (log_p_teacher - log_p_student))
    return terms.sum(dim=1).mean() * (temperature**2)


def mask_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, name: str = "mask_kd") -> Tensor:
    """Binary mask distillation: BCE of the student's mask logits against the teacher's probabilities.

    ``BCE(sigmoid(student/T), sigmoid(teacher/T)) * T^2``, averaged over all pixels.

    Example::

        >>> t = torch.tensor([[0.0, 0.0]])
        >>> round(float(mask_kd(t, t)), 4)  # ln 2: both at p = 0.5
        0.6931
    """
    _check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits, name)
    target = torch.sigmoid(teacher_logits / temperature)
    return F.binary_cross_entropy_with_logits(student_logits / temperature, target) * (temperature**2)


class FeatureAdapter(nn.Module):
    """A learned 1x1 projection of student features (channel dimension 1) onto the teacher's channels.

    Works for ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` and higher. Make it an ordinary submodule of the
    student so that it is trained, checkpointed and moved with it.

    Args:
        in_channels: student channels.
        out_channels: teacher channels.

    Example::

        >>> FeatureAdapter(8, 32)(torch.zeros(2, 8, 5, 5)).shape
        torch.Size([2, 32, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return self.proj(x)
        return self.proj(x.movedim(1, -1)).movedim(-1, 1)


def feature_mse(
    student_features: Tensor,
    teacher_features: Tensor,
    adapter: Optional[nn.Module] = None,
    name: str = "feature_mse",
) -> Tensor:
    """Mean squared error between (optionally adapted) student features and teacher features.

    Args:
        student_features: student activations ``(N, C_s, ...)``.
        teacher_features: teacher activations ``(N, C_t, ...)``.
        adapter: maps student features to the teacher's shape (e.g. :class:`FeatureAdapter`); needed when
            ``C_s != C_t``.
        name: names the layer pair in the error raised when the shapes do not match.

    Raises:
        ValueError: the shapes differ after the adapter; the message names ``name`` and both shapes.

    Example::

        >>> float(feature_mse(torch.ones(2, 3), torch.zeros(2, 3)))
        1.0
    """
    if adapter is not None:
        student_features = adapter(student_features)
    if student_features.shape != teacher_features.shape:
        hint = "" if adapter is not None else "; pass `adapter=FeatureAdapter(student_channels, teacher_channels)`"
        raise ValueError(
            f"{name}: student features {tuple(student_features.shape)} do not match teacher features "
            f"{tuple(teacher_features.shape)}{hint}"
        )
    return F.mse_loss(student_features, teacher_features)
