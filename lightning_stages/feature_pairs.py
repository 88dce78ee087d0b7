"""Feature distillation on the ground floor: the learned 1x1 adapter that maps student features to the teacher's,
the mean squared error of one pair, and the pairing of hooked layers (:func:`paired_feature_losses`), with the one
shape check and the one adapter check they share. :mod:`lightning_stages.losses` exports every public name here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import torch  # noqa: F401 - the docstring examples use it
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stages.errors import did_you_mean

__all__ = ["FeatureAdapter", "feature_mse", "feature_pair_name", "paired_feature_losses"]



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


def _adapted(adapter: Callable[[Tensor], Tensor], student: Tensor, target: Tensor, pair: str, whose: str) -> Tensor:
    """``adapter(student)``, or a ``ValueError`` naming ``pair``, ``whose`` adapter and both shapes when it fails or
    returns something other than a tensor."""
    shapes = f"student features {tuple(student.shape)} (teacher features {tuple(target.shape)})"
    try:
        adapted = adapter(student)
    except Exception as err:  # a user's module that does not fit its features: named with the pair, not raw
        raise ValueError(f"{pair}: {whose} failed on {shapes}: {type(err).__name__}: {err}") from err
    if not isinstance(adapted, Tensor):
        raise ValueError(f"{pair}: {whose} returned a {type(adapted).__name__}, not a tensor, for {shapes}; make it "
                         "return the mapped features")
    return adapted


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
        ValueError: the adapter fails on the features (or returns no tensor), or the shapes differ after it; the
            message names ``name`` and both shapes.

    Example::

        >>> float(feature_mse(torch.ones(2, 3), torch.zeros(2, 3)))
        1.0
    """
    if adapter is not None:
        student_features = _adapted(adapter, student_features, teacher_features, name, "the adapter")
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
        ValueError: the layer lists differ in length, an adapter is keyed by no layer of ``student_layers`` (it would
            never run), a layer is not in the captured features, an adapter fails on its features (or returns no
            tensor), the shapes of a pair differ after its adapter (the message names the pair and both shapes, the
            same shape message as :func:`feature_mse`), or two pairs get the same key (one loss would replace the
            other).

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
    for key in adapters or {}:
        if key not in student_layers:
            hint = did_you_mean(str(key), list(student_layers)) or "key each adapter by the student layer it maps"
            raise ValueError(f"`adapters` = {key!r}: is not a student layer paired with teacher {teacher!r} "
                             f"({list(student_layers)}), so its adapter would never run; {hint}")
    losses: dict[str, Tensor] = {}
    pairs: dict[str, str] = {}  # each loss's key -> its pair, for the message when two pairs share a key
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
            student = _adapted(adapter, student, target, pair, f"the adapter of {s_path!r}")
        _check_features(student, target, pair, adapted=adapter is not None,
                        fix=f"adapters={{{s_path!r}: FeatureAdapter(student_channels, teacher_channels)}}")
        key = feature_pair_name(s_path, teacher, t_path)
        if key in pairs:
            raise ValueError(f"{pair}: its loss is named {key!r}, as is the loss of the pair {pairs[key]}, so one "
                             "would replace the other; " + ("the pair is listed twice" if pairs[key] == pair else
                                                             "hook layers whose paths differ by more than selectors "
                                                             "and characters loggers refuse"))
        pairs[key] = pair
        losses[key] = loss_fn(student, target)
    return losses
