"""Functional distillation losses, the learned 1x1 adapter that maps student features to the teacher's, and the
functions that pair hooked features and weight losses (the math behind ``DistillationModule``)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stages.errors import did_you_mean

__all__ = ["FeatureAdapter", "feature_mse", "feature_pair_name", "logit_kd", "mask_kd", "paired_feature_losses", "weighted_sum"]


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"Expected argument `temperature` to be a positive finite number but got {temperature!r}")


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


def _shape_hint(student: tuple[int, ...], teacher: tuple[int, ...], fix: str) -> str:
    """What fixes a feature shape mismatch: an adapter when the channels differ, pooling or interpolation when only
    the spatial size (or the sequence length) differs, which no channel adapter can fix."""
    if len(student) != len(teacher) or len(student) < 2 or student[0] != teacher[0]:
        return "the features must have the same batch size and number of dimensions"
    differ = [d for d in range(1, len(student)) if student[d] != teacher[d]]
    pool = ("pool or interpolate the student's features to the teacher's size in an adapter (e.g. "
            "F.adaptive_avg_pool2d or F.interpolate); a FeatureAdapter maps channels only")
    tokens = fix.replace("teacher_channels)", "teacher_channels, channels_last=True)")
    if differ == [1]:
        if len(student) == 3:
            return (f"dimension 1 differs: for (N, C, L) features the channels, pass `{fix}`; for (N, L, C) tokens "
                    "the sequence length: pool or interpolate the tokens; a FeatureAdapter maps channels only")
        return f"the channels differ; pass `{fix}`"
    if differ == [len(student) - 1] and len(student) == 3:
        return f"the channels of (N, L, C) token features differ; pass `{tokens}`"
    if differ == [len(student) - 1]:  # the channels of (N, H, W, C) features, or the width of (N, C, H, W) ones
        return f"the last dimension differs: for channels-last features the channels, pass `{tokens}`; else {pool}"
    if 1 not in differ:
        return f"only the spatial size differs: {pool}"
    return f"the channels and the spatial size differ: {pool}, and map the channels (`{fix}`)"


def _check_features(student: Tensor, teacher: Tensor, name: str, adapted: bool, fix: str) -> None:
    """The one shape check of feature distillation: ``student`` (after its adapter, if ``adapted``) vs ``teacher``."""
    if student.shape != teacher.shape:
        s_shape, t_shape = tuple(student.shape), tuple(teacher.shape)
        hint = _shape_hint(s_shape, t_shape, fix)
        if adapted and "`" in hint:  # the adapter is there: no advice to add one, but pooling still
            hint = "make the adapter's output match the teacher's features" + (
                "; pool or interpolate where the size (or the sequence length) differs" if "pool" in hint else "")
        how = " after the adapter" if adapted else ""
        raise ValueError(f"{name}: student features {s_shape} do not match teacher features {t_shape}{how}; {hint}")


@functools.lru_cache(maxsize=1024)  # the same few pairs at every step
def feature_pair_name(student_layer: str, teacher: str, teacher_layer: str) -> str:
    """The key of a layer pair in :func:`paired_feature_losses`: ``"<student layer>__<teacher>.<teacher layer>"``,
    with selectors written as path segments, so that every common logger accepts it (MLflow allows only letters,
    digits, ``_ - . / :`` and spaces).

    Example::

        >>> feature_pair_name("bert.encoder.layer.1[0]", "teacher", "bert.encoder:last_hidden_state")
        'bert.encoder.layer.1.0__teacher.bert.encoder.last_hidden_state'
    """

    safe = [re.sub(r"[^A-Za-z0-9_.\-]", "_", re.sub(r"\[(-?\d+)\]|:", lambda m: f".{m[1]}" if m[1] else ".", text))
            for text in (student_layer, teacher, teacher_layer)]
    return f"{safe[0]}__{safe[1]}.{safe[2]}".replace(".__", "__")


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
    _check_temperature(temperature)
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
    # a broken teacher still comes through (masked_fill: the values and gradient of a where, two operations fewer)
    terms = (p_teacher * (log_p_teacher - log_p_student)).masked_fill(p_teacher == 0, 0.0)
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
    _check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits, name)
    student, teacher = _float_pair(student_logits, teacher_logits)
    return F.binary_cross_entropy_with_logits(student / temperature, torch.sigmoid(teacher / temperature)) * (
        temperature**2)


class FeatureAdapter(nn.Module):
    """A learned 1x1 projection of student features onto the teacher's channels.

    Channels first by default: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` and higher. With ``channels_last=True``
    the channels are the last dimension, as in transformer token features ``(N, L, C)`` or ``(N, H, W, C)``. Make it
    an ordinary submodule of the student so that it is trained, checkpointed and moved with it.

    Args:
        in_channels: student channels.
        out_channels: teacher channels.
        channels_last: the channels are the last dimension (token features) instead of dimension 1.

    Raises:
        ValueError: the features do not have ``in_channels`` channels where the layout says; the message names the
            shape and the layout.

    Example::

        >>> FeatureAdapter(8, 32)(torch.zeros(2, 8, 5, 5)).shape
        torch.Size([2, 32, 5, 5])
        >>> FeatureAdapter(8, 32, channels_last=True)(torch.zeros(2, 7, 8)).shape  # (N, L, C) tokens
        torch.Size([2, 7, 32])
    """

    def __init__(self, in_channels: int, out_channels: int, channels_last: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        dim = -1 if self.channels_last or x.dim() == 2 else 1
        if x.dim() < 2 or x.shape[dim] != self.proj.in_features:
            layout = "channels last" if self.channels_last else "channels first (dimension 1)"
            other = "channels_last=False" if self.channels_last else "channels_last=True for token features (N, L, C)"
            raise ValueError(f"FeatureAdapter({self.proj.in_features}, {self.proj.out_features}) expects "
                             f"{self.proj.in_features} channels, {layout}, but got features of shape {tuple(x.shape)}"
                             f"; check the channels or pass {other}")
        if dim == -1:
            return self.proj(x)
        return self.proj(x.movedim(1, -1)).movedim(-1, 1)

    def extra_repr(self) -> str:
        return "channels_last=True" if self.channels_last else ""


def feature_mse(student_features: Tensor, teacher_features: Tensor, adapter: Optional[nn.Module] = None,
                name: str = "feature_mse") -> Tensor:
    """Mean squared error between (optionally adapted) student features and teacher features.

    Args:
        student_features, teacher_features: activations ``(N, C_s, ...)`` and ``(N, C_t, ...)``.
        adapter: maps student features to the teacher's shape (e.g. :class:`FeatureAdapter`), when ``C_s != C_t``.
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
        ``{"<student layer>__<teacher>.<teacher layer>": loss}`` (:func:`feature_pair_name`, names every common logger
        accepts).

    Raises:
        ValueError: the layer lists differ in length, a layer is not in the captured features, an adapter fails on
            its features, or the shapes of a pair differ after its adapter; the message names the pair and both
            shapes (the same shape message as :func:`feature_mse`).

    Example::

        >>> student = {"neck": torch.ones(2, 3)}
        >>> teacher = {"layer4": torch.zeros(2, 3)}
        >>> {k: float(v) for k, v in paired_feature_losses(student, teacher, ["neck"], ["layer4"]).items()}
        {'neck__teacher.layer4': 1.0}
        >>> paired_feature_losses(student, {"layer4": torch.zeros(2, 5)}, ["neck"], ["layer4"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: neck -> teacher.layer4: student features (2, 3) do not match teacher features (2, 5); the channels differ; ...
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
        student, target = student_features[s_path], teacher_features[t_path]
        if adapter is not None:
            try:
                student = adapter(student)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"{pair}: the adapter of {s_path!r} failed on student features "
                                 f"{tuple(student.shape)} (teacher features {tuple(target.shape)}): {err}") from err
        _check_features(student, target, pair, adapted=adapter is not None,
                        fix=f"adapters={{{s_path!r}: FeatureAdapter(student_channels, teacher_channels)}}")
        losses[feature_pair_name(s_path, teacher, t_path)] = loss_fn(student, target)
    return losses


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
        weight = loss_weights[key]
        # 1 * loss is loss: no operation and no backward node (a tensor weight is never compared: no host sync)
        term = loss if isinstance(weight, (int, float)) and weight == 1 else weight * loss
        total = term if total is None else total + term
    values: list[Tensor] = []
    if distill_losses is not None:
        values = [distill_losses] if isinstance(distill_losses, Tensor) else (
            list(distill_losses.values()) if isinstance(distill_losses, Mapping) else list(distill_losses))
        if values:
            distill = sum(values[1:], values[0])
            term = distill if isinstance(lambda_coef, (int, float)) and lambda_coef == 1 else lambda_coef * distill
            total = term if total is None else total + term
    if total is None:
        raise ValueError(f"`task_losses` = {dict(task_losses)!r}: no losses to weight (and no distillation losses)")
    if any(total is loss for loss in [*task_losses.values(), *values]):  # one term of weight 1: never hand back the caller's own tensor
        total = total * 1
    return total
