"""``teacher_fingerprint``: a hash of what the teachers' outputs depend on, the key of a teacher cache."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["teacher_fingerprint"]

_FORMAT_VERSION = 2


@functools.lru_cache(maxsize=256)
def _class_code(cls: type) -> str:
    """A class's module, name and (outside torch) source; the name alone when the source cannot be read."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__.split(".")[0] == "torch":
        return name
    try:
        return f"{name}\n{inspect.getsource(cls)}"
    except (OSError, TypeError):
        return name


def teacher_fingerprint(
    teachers: Mapping[str, nn.Module], feature_layers: Optional[Mapping[str, Sequence[str]]] = None,
    extra: Any = None, version: Optional[str] = None,
) -> str:
    """A hash of what the teachers' outputs depend on: weights and buffers, code, hooked layers and ``extra``.

    Two fingerprints are equal only if every teacher has the same name, the same ``state_dict`` and non-persistent
    buffers (``register_buffer(..., persistent=False)``; names, dtypes, shapes and bytes), the same classes of modules
    and the same hooked layers. The code of a class is its source
    (``inspect.getsource``; torch's own classes by name), so editing a teacher's ``forward`` changes the fingerprint.
    ``version`` replaces the sources: give one when they cannot be read or change without changing the outputs. It
    reads every weight once (about 20 ms per 40 MB here).

    Args:
        teachers: ``{name: module}``.
        feature_layers: ``{teacher name: [hooked submodule paths]}``.
        extra: any JSON-serialisable value that also changes the outputs (e.g. the autocast precision).
        version: a version of the teachers' code, used instead of their source.

    Example::

        >>> teacher = nn.Linear(2, 2)
        >>> a = teacher_fingerprint({"t": teacher}, {"t": [""]})
        >>> a == teacher_fingerprint({"t": teacher}, {"t": [""]}), a == teacher_fingerprint({"t": teacher})
        (True, False)
        >>> a == teacher_fingerprint({"t": teacher}, {"t": [""]}, version="v2")
        False
        >>> with torch.no_grad():
        ...     _ = teacher.weight.add_(1.0)
        >>> a == teacher_fingerprint({"t": teacher}, {"t": [""]})
        False
    """
    digest = hashlib.sha256()
    layers = {str(k): [str(p) for p in v] for k, v in sorted((feature_layers or {}).items())}
    digest.update(json.dumps({"version": _FORMAT_VERSION, "layers": layers, "extra": extra, "code": version},
                             sort_keys=True, default=str).encode())
    for name in sorted(teachers):
        digest.update(f"teacher:{name}".encode())
        classes = dict.fromkeys(type(module) for module in teachers[name].modules())
        for cls in classes:
            digest.update((f"{cls.__module__}.{cls.__qualname__}" if version is not None else _class_code(cls)).encode())  # type: ignore[arg-type]
        state = teachers[name].state_dict()
        for key, value in state.items():
            _update(digest, key, value)
        # buffers registered with persistent=False (normalisation constants, rotary inv_freq) change the outputs too;
        # hashed after the state_dict under their own prefix, so a teacher without them keeps its fingerprint
        for key, buffer in sorted(teachers[name].named_buffers(), key=lambda item: item[0]):
            if key not in state:
                _update(digest, f"buffer:{key}", buffer)
    return digest.hexdigest()[:32]


def _update(digest: Any, key: str, value: Any) -> None:
    """Add ``key`` and ``value`` to ``digest``: a tensor's dtype, shape and bytes, anything else by its ``repr``."""
    if not isinstance(value, Tensor):
        digest.update(f"{key}={value!r}".encode())
        return
    tensor = value.detach()
    digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    if tensor.is_meta or tensor.numel() == 0:
        return
    flat = tensor.cpu().contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy())
