"""What a :class:`~lightning_stages.TeacherCache` row is: the layout of the stored tensors and the row checksums.

Pure functions, shared by the cache and its two storages (``teacher_cache_storage.py``):

* :func:`flatten` / :func:`unflatten`: teacher outputs and features <-> a JSON description plus a list of tensors
  with one row per sample;
* :func:`row_hash`: a 64-bit checksum of each row of an ``int64`` matrix (vectorised, on any device);
* :func:`input_fingerprints`: a checksum of each sample's teacher inputs, so that a stored row is only served for
  the input it was computed from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_stages.errors import StageConfigError, StageProblem

__all__ = ["flatten", "input_fingerprints", "row_hash", "too_large", "unflatten"]

_MASK32 = 0xFFFFFFFF
_MASK35 = (1 << 35) - 1
_MIX = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as a signed 64-bit integer (splitmix64's first multiplier)
_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15
_multipliers_cache: dict[tuple[int, str], Tensor] = {}


def flatten(value: Any, leaves: list[Tensor], where: str) -> Any:
    """A JSON description of ``value`` whose tensors are appended to ``leaves`` (and named by their position).

    Example::

        >>> leaves = []
        >>> flatten({"logits": torch.zeros(2, 3), "aux": (torch.ones(2), None)}, leaves, "output")
        {'map': ['logits', 'aux'], 'items': [0, {'seq': 'tuple', 'items': [1, {'none': True}]}]}
        >>> len(leaves)
        2
    """
    if isinstance(value, Tensor):
        leaves.append(value)
        return len(leaves) - 1
    if value is None:
        return {"none": True}
    if isinstance(value, (tuple, list)):
        return {"seq": "list" if isinstance(value, list) else "tuple",
                "items": [flatten(v, leaves, where) for v in value]}
    if isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise StageConfigError(
                StageProblem("cannot be cached: mapping keys must be strings", name="teacher_cache", field=where,
                             value=keys)
            )
        return {"map": keys, "items": [flatten(value[k], leaves, where) for k in keys]}
    raise StageConfigError(
        StageProblem(f"cannot be cached: {type(value).__name__} is not a tensor, tuple, list, dict or None",
                     name="teacher_cache", field=where, value=type(value).__name__,
                     hint="return tensors or plain containers of tensors from the teacher and the hooked layers")
    )


def unflatten(spec: Any, leaves: Sequence[Any]) -> Any:
    """The value :func:`flatten` described, built from ``leaves``.

    Example::

        >>> unflatten({'seq': 'tuple', 'items': [1, {'none': True}]}, ["a", "b"])
        ('b', None)
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        return leaves[spec]
    if spec.get("none") is True:
        return None
    if "map" in spec:
        return {str(k): unflatten(s, leaves) for k, s in zip(spec["map"], spec["items"], strict=True)}
    items = [unflatten(s, leaves) for s in spec["items"]]
    return items if spec["seq"] == "list" else tuple(items)


def too_large(values: Tensor, dtype: torch.dtype) -> Optional[float]:
    """The largest finite magnitude in ``values`` if ``dtype`` cannot hold it (it would become ``inf``), else ``None``.

    Example::

        >>> too_large(torch.tensor([1.0, -7e4, float("inf")]), torch.float16), too_large(torch.ones(2), torch.float16)
        (70000.0, None)
    """
    if not values.is_floating_point() or not values.numel() or torch.finfo(dtype).max >= torch.finfo(values.dtype).max:
        return None
    largest = float(values.detach().abs().masked_fill(~torch.isfinite(values), 0).max())
    return largest if largest > torch.finfo(dtype).max else None


def _multipliers(count: int, device: torch.device) -> Tensor:
    """``count`` odd pseudo-random 64-bit multipliers, one per word position (the same on every device)."""
    key = (count, str(device))
    cached = _multipliers_cache.get(key)
    if cached is None:
        m = torch.arange(1, count + 1, dtype=torch.int64, device=device) * _GOLDEN
        m = (m ^ ((m >> 31) & _MASK32)) * _MIX
        cached = m | 1
        if len(_multipliers_cache) > 64:
            _multipliers_cache.clear()
        _multipliers_cache[key] = cached
    return cached


def row_hash(words: Tensor) -> Tensor:
    """A 64-bit checksum of each row of the ``int64`` matrix ``words`` (wrapping arithmetic, any device).

    Each word is multiplied by an odd constant of its position, mixed (``x ^ (x >>> 29)``, a bijection) and the
    results are summed: changing any one word always changes the sum, and reordered words change it too. Four
    vectorised passes over the data (about 0.1 ms for 256 rows of 512 float32 values on one CPU thread).

    Example::

        >>> words = torch.tensor([[1, 2, 3], [1, 2, 3], [3, 2, 1]])
        >>> h = row_hash(words)
        >>> bool(h[0] == h[1]), bool(h[0] == h[2])
        (True, False)
    """
    x = words * _multipliers(words.shape[-1], words.device)
    x ^= (x >> 29) & _MASK35
    return x.sum(-1)


def _bytes_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _tensor_rows_hash(tensor: Tensor, rows: int) -> Tensor:
    """:func:`row_hash` of each of the ``rows`` rows of ``tensor``'s bytes, salted with its dtype and row shape."""
    flat = tensor.detach().reshape(rows, -1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    data = flat.view(torch.uint8) if flat.shape[1] else flat.new_zeros((rows, 0), dtype=torch.uint8)
    if data.shape[1] % 8:
        padded = data.new_zeros((rows, data.shape[1] + 8 - data.shape[1] % 8))
        padded[:, : data.shape[1]] = data
        data = padded
    salt = _bytes_hash(f"{tensor.dtype}{tuple(tensor.shape[1:])}")
    return row_hash(data.view(torch.int64)) + salt


def input_fingerprints(inputs: Any, rows: int) -> Tensor:
    """One 64-bit checksum per sample of the teachers' ``inputs`` (a CPU ``int64`` tensor of ``rows`` values).

    Tensors with ``rows`` rows are hashed row by row; any other tensor, and plain values (numbers, strings, None),
    enter every row's checksum; other objects enter by their type only.

    Example::

        >>> x = torch.arange(6.0).reshape(3, 2)
        >>> a = input_fingerprints(((x,), {}), 3)
        >>> bool(a[0] == input_fingerprints(((x[:1],), {}), 1)[0]), bool(a[0] == a[1])
        (True, False)
    """
    total = torch.zeros(rows, dtype=torch.int64)
    if rows == 0:
        return total
    shared = 0

    def visit(value: Any) -> None:
        nonlocal total, shared
        if isinstance(value, Tensor):
            if value.dim() and value.shape[0] == rows and not value.is_sparse and not value.is_meta:
                total = total * 31 + _tensor_rows_hash(value, rows).cpu()
            elif value.is_sparse or value.is_meta:
                shared = shared * 31 + _bytes_hash(f"{value.dtype}{tuple(value.shape)}")
            else:
                shared = shared * 31 + int(_tensor_rows_hash(value.reshape(1, -1), 1))
            shared &= (1 << 63) - 1
        elif isinstance(value, Mapping):
            for key in value:
                shared = (shared * 31 + _bytes_hash(repr(key))) & ((1 << 63) - 1)
                visit(value[key])
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        else:
            plain = isinstance(value, (int, float, str, bool, type(None)))
            text = repr(value)[:1000] if plain else type(value).__qualname__
            shared = (shared * 31 + _bytes_hash(text)) & ((1 << 63) - 1)

    visit(inputs)
    return total + shared
