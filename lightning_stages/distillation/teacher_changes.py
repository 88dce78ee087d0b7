"""What a cached training step watches on its teachers besides their key: weights replaced rather than written
(:func:`registrations`), teachers whose outputs are random (:func:`refuse_random_teachers`), and hooked layers whose
samples are not their first dimension (:func:`sequence_first_layers`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from lightning_stages.distillation.feature_selectors import split_hook_path
from lightning_stages.errors import DistillationStepError, StageProblem

__all__ = ["refuse_random_teachers", "registrations", "sequence_first_layers", "warn_sequence_first"]

_registered = [0, False]  # weights, buffers and submodules set on any module since the hooks below were installed


def registrations() -> int:
    """How many parameters, buffers and submodules have been set on modules in this process since the first call: a
    weight replaced rather than written (``load_state_dict(assign=True)``, ``teacher.head = new_head``) moves it,
    while an in-place write moves the tensors' version counters only. One integer to compare at each cached step."""
    if not _registered[1]:
        def count(*_: Any) -> None:
            _registered[0] += 1

        torch_module.register_module_parameter_registration_hook(count)
        torch_module.register_module_buffer_registration_hook(count)
        torch_module.register_module_module_registration_hook(count)
        _registered[1] = True
    return int(_registered[0])


def refuse_random_teachers(teachers: Mapping[str, nn.Module], stage: Optional[str]) -> None:
    """Refuse a teacher with dropout or batch normalization in training mode, whose outputs are random or depend on
    the batch: a stored row would serve one draw for every later epoch.

    Raises:
        DistillationStepError: naming the teacher and the layer (the caller names the stage).
    """
    for name, teacher in teachers.items():
        for path, module in teacher.named_modules():
            # a batch norm without running statistics normalizes by the batch's, in eval mode too
            batch_stats = isinstance(module, _BatchNorm) and not module.training and module.running_mean is None
            if (module.training and isinstance(module, (_DropoutNd, _BatchNorm))) or batch_stats:
                where = f"{name}.{path}" if path else name
                raise DistillationStepError(StageProblem(
                    ("keeps no running statistics (track_running_stats=False)" if batch_stats else "is in training mode")
                    + f", so teacher {name!r} computes a random or batch-dependent output, and a stored row would "
                    "stand for one draw in every later epoch", name=None, field=f"teachers.{where}",
                    value=type(module).__name__, hint=("give it running statistics" if batch_stats else
                    "teachers are put in eval mode when prepared: keep them there (something called .train() on it)")
                    + ", or set teacher_cache = None to run the teacher at every step"), stage=stage,
                    when="a training step")


def sequence_first_layers(teachers: Mapping[str, nn.Module], layers: Mapping[str, Sequence[str]]) -> list[str]:
    """The hooked teacher layers whose selected output has its samples in the second dimension: an
    ``nn.MultiheadAttention`` or transformer layer without ``batch_first=True`` (its output, not its attention weights),
    an ``nn.RNN``/``LSTM``/``GRU`` without it, and any recurrent layer's ``h_n``/``c_n`` (``lstm[1]``)."""
    found = []
    for name, paths in layers.items():
        for path in paths:
            try:
                module_path, steps = split_hook_path(path)
                module = teachers[name].get_submodule(module_path)
                batch_first = _batch_first(module)
            except Exception:  # a path the hooks refuse on their own, an odd attribute: no warning
                continue
            first = steps[0] % 2 if steps and isinstance(steps[0], int) else steps[0] if steps else None
            if batch_first is None:  # not an attention or recurrent layer
                continue
            if isinstance(module, nn.RNNBase):  # (output, h_n) or (output, (h_n, c_n)); h_n never batch-first
                late = first == 1 or (not batch_first and first in (None, 0))
            else:  # attention: (output, weights), the weights batch-first; a transformer: its output
                late = not batch_first and first in (None, 0)
            if late:
                found.append(f"{name}.{path} ({type(module).__name__})" if path else
                             f"{name} ({type(module).__name__}, its output)")
    return found


def _batch_first(module: nn.Module) -> Optional[bool]:
    """Whether an attention, transformer or recurrent layer takes and gives its samples first (``None``: another
    kind of module). ``nn.TransformerEncoder``/``Decoder`` keep it in their layers' attention."""
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        module = module.layers[0]
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)):
        return bool(module.batch_first)
    attention = getattr(module, "self_attn", None)
    return bool(attention.batch_first) if isinstance(attention, nn.MultiheadAttention) else None


def warn_sequence_first(teachers: Mapping[str, nn.Module], layers: Mapping[str, Sequence[str]], stored: bool) -> None:
    """Warn of each hooked layer of :func:`sequence_first_layers` when the cache stores features (``stored``): its
    first dimension is stored as the samples'. Refused with a clear error when its length differs from the batch
    size, it would be served to other batches when they are equal."""
    outputs = {name: [""] for name in teachers}  # the teachers' own outputs are always stored
    for layer in sequence_first_layers(teachers, {**outputs, **layers} if stored else outputs):
        warnings.warn(f"TeacherCache: {layer} gives its samples in the second dimension, and the "
                      "cache stores the first as the samples': make it batch-first (batch_first=True, or select its "
                      "batch-first output), or use TeacherCache(store_features=False)", UserWarning, stacklevel=2)
