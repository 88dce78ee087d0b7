"""Functional distillation losses, the learned 1x1 adapter that maps student features to the teacher's, and the
functions that pair hooked features and weight losses (the math behind ``DistillationModule``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stages.errors import did_you_mean

__all__ = ["FeatureAdapter", "feature_mse", "logit_kd", "mask_kd", "paired_feature_losses", "weighted_sum"]


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


def _check_features(student: Tensor, teacher: Tensor, name: str, adapted: bool, fix: str) -> None:
    """The one shape check of feature distillation: ``student`` (after its adapter, if ``adapted``) vs ``teacher``."""
    if student.shape != teacher.shape:
        how = " after the adapter" if adapted else f"; pass `{fix}`"
        raise ValueError(
            f"{name}: student features {tuple(student.shape)} do not match teacher features {tuple(teacher.shape)}{how}"
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
    _check_features(student_features, teacher_features, name, adapted=adapter is not None,
                    fix="adapter=FeatureAdapter(student_channels, teacher_channels)")
    return F.mse_loss(student_features, teacher_features)


def paired_feature_losses(
    student_features: Mapping[str, Tensor],
    teacher_features: Mapping[str, Tensor],
    student_layers: Sequence[str],
    teacher_layers: Sequence[str],
    adapters: Optional[Mapping[str, Callable[[Tensor], Tensor]]] = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
    teacher: str = "teacher",
) -> dict[str, Tensor]:
    """One loss per pair of hooked layers: ``loss_fn(adapter(student[s]), teacher[t])``, paired in the listed order.

    Args:
        student_features: ``{layer path: features}`` captured from the student.
        teacher_features: ``{layer path: features}`` captured from the teacher.
        student_layers: the student's layers to use, in order.
        teacher_layers: the teacher's layers, as many, in the same order.
        adapters: ``{student layer: module}`` mapping that layer's features to the teacher's shape (e.g.
            :class:`FeatureAdapter`); a layer without one is used as it is.
        loss_fn: ``loss_fn(student_features, teacher_features)``; mean squared error by default.
        teacher: the teacher's name, used in the keys and messages.

    Returns:
        ``{"<student layer> -> <teacher>.<teacher layer>": loss}``.

    Raises:
        ValueError: the layer lists differ in length, a layer is not in the captured features, or the shapes of a
            pair differ after its adapter; the message names the pair (the same shape message as
            :func:`feature_mse`).

    Example::

        >>> student = {"neck": torch.ones(2, 3)}
        >>> teacher = {"layer4": torch.zeros(2, 3)}
        >>> {k: float(v) for k, v in paired_feature_losses(student, teacher, ["neck"], ["layer4"]).items()}
        {'neck -> teacher.layer4': 1.0}
        >>> paired_feature_losses(student, {"layer4": torch.zeros(2, 5)}, ["neck"], ["layer4"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: neck -> teacher.layer4: student features (2, 3) do not match teacher features (2, 5); pass ...
    """
    if len(student_layers) != len(teacher_layers):
        raise ValueError(
            f"Expected as many student layers as layers of teacher {teacher!r} (they are paired in order) but got "
            f"{len(student_layers)} ({list(student_layers)}) and {len(teacher_layers)} ({list(teacher_layers)})"
        )
    losses: dict[str, Tensor] = {}
    for s_path, t_path in zip(student_layers, teacher_layers):
        pair = f"{s_path} -> {teacher}.{t_path}"
        missing = [f"{who} layer {path!r}" for who, path, captured in
                   (("student", s_path, student_features), (teacher, t_path, teacher_features)) if path not in captured]
        if missing:
            raise ValueError(f"{pair}: the {' and the '.join(missing)} captured nothing; run the student and the "
                             "teacher (run_teachers()) on the batch first")
        adapter = (adapters or {}).get(s_path)
        student = student_features[s_path] if adapter is None else adapter(student_features[s_path])
        target = teacher_features[t_path]
        _check_features(student, target, pair, adapted=adapter is not None,
                        fix=f"adapters={{{s_path!r}: FeatureAdapter(student_channels, teacher_channels)}}")
        losses[pair] = loss_fn(student, target)
    return losses


def weighted_sum(
    task_losses: Mapping[str, Tensor],
    loss_weights: Mapping[str, float],
    distill_losses: Union[Mapping[str, Tensor], Sequence[Tensor], Tensor, None] = None,
    lambda_coef: float = 1.0,
) -> Tensor:
    """``sum_k loss_weights[k] * task_losses[k] + lambda_coef * sum(distill_losses)``.

    Args:
        task_losses: ``{loss name: value}``; every name must be a key of ``loss_weights``.
        loss_weights: ``{loss name: weight}``; weights of losses not in ``task_losses`` are not used.
        distill_losses: distillation losses (mapping, sequence or one tensor); ``None`` or empty adds nothing.
        lambda_coef: the factor of the distillation sum.

    Raises:
        ValueError: a task loss has no weight (with the closest weight name), or there is no loss at all.

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
            hint = did_you_mean(str(key), list(loss_weights)) or "declare it in `loss_weights`"
            raise ValueError(f"`task_losses` = {key!r}: has no weight in `loss_weights` ({sorted(loss_weights)}); {hint}")
        term = loss_weights[key] * loss
        total = term if total is None else total + term
    if distill_losses is not None:
        values = [distill_losses] if isinstance(distill_losses, Tensor) else (
            list(distill_losses.values()) if isinstance(distill_losses, Mapping) else list(distill_losses))
        if values:
            term = lambda_coef * sum(values[1:], values[0])
            total = term if total is None else total + term
    if total is None:
        raise ValueError(f"`task_losses` = {dict(task_losses)!r}: no losses to weight (and no distillation losses)")
    return total
