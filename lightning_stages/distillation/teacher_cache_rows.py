"""What a :class:`~lightning_stages.TeacherCache` row is: the layout of the stored tensors and the row checksums.

Pure functions, shared by the cache and its two storages (``teacher_cache_storage.py``):

* :func:`flatten` / :func:`unflatten`: teacher outputs and features <-> a JSON description plus a list of tensors
  with one row per sample;
* :func:`word_hash`: a 64-bit checksum of each row of an ``int32`` matrix (vectorised, on any device), the one
  behind :func:`row_hash`, which guards the stored rows against corruption, and behind the checksum of the
  teachers' inputs (``teacher_cache_bytes.py``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_stages.errors import StageConfigError, StageProblem

__all__ = ["check_spec", "flatten", "flatten_named", "position_multipliers", "row_hash", "rows_problem", "too_large",
           "unflatten", "word_hash"]

_MASK32 = 0xFFFFFFFF
_WIDENED_BYTES = 1 << 23  # word_hash widens about 8 MiB of words at a time
_BLOCK_COLUMNS = 1 << 17  # and at most this many columns (1 MiB of multipliers)
_MIX = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as a signed 64-bit integer (splitmix64's first multiplier)
_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15
_MASK31 = (1 << 31) - 1
_HIGH31 = -(1 << 33)  # the high 31 bits of a 64-bit word
_SPREAD1, _SPREAD2 = 0x2C1B3C6D, 0x297A2D39  # odd: multiplying by them modulo 2**31 is a bijection
_MULTIPLIERS_KEPT = 1 << 26  # bytes of multipliers kept between calls: 8M word positions, a sample's tensors in all
_multipliers_cache: dict[tuple[int, int, torch.device], Tensor] = {}
_multipliers_bytes = 0


_SUPPORTED = ("tensors, None, and tuples, lists, namedtuples, dicts, OrderedDicts, dataclasses and ModelOutputs of "
              "them (string keys)")


def _type_name(kind: type) -> str:
    return f"{kind.__module__}:{kind.__qualname__}"


def _type_of(name: str) -> type:
    """The class ``module:qualname`` from an already imported module (the teacher's code imported it).

    Raises:
        LookupError: the module is not imported or has no such class.
    """
    module_name, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, type):
        raise LookupError(f"the stored container type {name} is not available in this process")
    return found


def _unsupported(value: Any, where: str) -> StageConfigError:
    return StageConfigError(StageProblem(
        f"cannot be cached: a {type(value).__name__} ({_type_name(type(value))}) is not one of the containers the "
        "cache rebuilds", name="teacher_cache", field=where, value=type(value).__name__,
        hint=f"the cache stores {_SUPPORTED}; return one of those from the teacher (or a hooked layer's selector)"))


def flatten(value: Any, leaves: list[Tensor], where: str) -> Any:
    """A JSON description of ``value`` whose tensors are appended to ``leaves`` (and named by their position).

    Containers are rebuilt as the type that was stored: ``tuple``, ``list``, ``dict``, ``OrderedDict``, a namedtuple
    (from its items), a dataclass (from its fields) and a mapping that is also a dataclass, as transformers'
    ``ModelOutput`` (from its items). Any other container is refused.

    Raises:
        StageConfigError: naming ``where`` and the type, for a value of another type (or a mapping with keys that
            are not strings, a dataclass with fields that ``__init__`` does not take).

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
    kind = type(value)
    if isinstance(value, tuple) and kind is not tuple:
        if not hasattr(value, "_fields") or not hasattr(kind, "_make"):
            raise _unsupported(value, where)
        return {"seq": "namedtuple", "type": _type_name(kind), "items": [flatten(v, leaves, where) for v in value]}
    if kind in (tuple, list):
        return {"seq": kind.__name__, "items": [flatten(v, leaves, where) for v in value]}
    if isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise StageConfigError(
                StageProblem("cannot be cached: mapping keys must be strings", name="teacher_cache", field=where,
                             value=keys)
            )
        spec: dict[str, Any] = {"map": keys, "items": [flatten(value[k], leaves, where) for k in keys]}
        if kind is OrderedDict or (dataclasses.is_dataclass(value) and _takes_fields(kind, keys)):
            spec["type"] = _type_name(kind)  # OrderedDict(items); a ModelOutput: cls(**items)
        elif kind is not dict:
            raise _unsupported(value, where)
        return spec
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
        if not _takes_fields(kind, names):
            raise _unsupported(value, where)
        return {"fields": names, "type": _type_name(kind),
                "items": [flatten(getattr(value, n), leaves, where) for n in names]}
    raise _unsupported(value, where)


def _takes_fields(kind: type, names: list[str]) -> bool:
    """Whether the dataclass ``kind`` is rebuilt by ``kind(**{name: value})`` (every name an ``__init__`` field)."""
    init = {f.name for f in dataclasses.fields(kind) if f.init}
    return set(names) <= init and all(f.init for f in dataclasses.fields(kind) if f.name in names)


def unflatten(spec: Any, leaves: Sequence[Any]) -> Any:
    """The value :func:`flatten` described, built from ``leaves``.

    Raises:
        LookupError: a stored container type is not a class of a module imported in this process.

    Example::

        >>> unflatten({'seq': 'tuple', 'items': [1, {'none': True}]}, ["a", "b"])
        ('b', None)
        >>> rebuilt = unflatten({'map': ['x'], 'items': [0], 'type': 'collections:OrderedDict'}, ["a"])
        >>> type(rebuilt).__name__, rebuilt["x"]
        ('OrderedDict', 'a')
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        return leaves[spec]
    if spec.get("none") is True:
        return None
    items = [unflatten(s, leaves) for s in spec["items"]]
    kind = _type_of(spec["type"]) if "type" in spec else None
    if "map" in spec:
        pairs = {str(k): v for k, v in zip(spec["map"], items, strict=True)}
        if kind is None:
            return pairs
        return kind(pairs) if kind is OrderedDict else kind(**pairs)
    if "fields" in spec:
        return kind(**dict(zip(spec["fields"], items, strict=True)))  # type: ignore[misc]
    if spec["seq"] == "namedtuple":
        return kind._make(items)  # type: ignore[union-attr]
    return items if spec["seq"] == "list" else tuple(items)


def check_spec(spec: Any, count: int) -> None:
    """Check that ``spec`` is a description :func:`flatten` writes, of leaves below ``count`` (types unresolved).

    Raises:
        ValueError: it is not (e.g. a damaged file header).

    Example::

        >>> check_spec({"seq": "tuple", "items": [0, {"none": True}]}, 1)
        >>> check_spec({"seq": "tuple", "items": [3]}, 1)
        Traceback (most recent call last):
        ...
        ValueError: not a stored value: 3
        >>> check_spec({"map": ["a", "b"], "items": [0]}, 1)
        Traceback (most recent call last):
        ...
        ValueError: not stored names: ['a', 'b']
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 0 <= spec < count:
            raise ValueError(f"not a stored value: {spec}")
        return
    if not isinstance(spec, dict) or (spec.get("none") is not True and not isinstance(spec.get("items"), list)):
        raise ValueError(f"not a stored value: {spec!r}")
    if "type" in spec and not isinstance(spec["type"], str):
        raise ValueError(f"not a stored type: {spec['type']!r}")
    for names in ("map", "fields"):  # a name per item (a fields spec, like a namedtuple's, rebuilds its type)
        if names in spec and not (isinstance(spec[names], list) and len(spec[names]) == len(spec["items"])
                                  and all(isinstance(name, str) for name in spec[names])):
            raise ValueError(f"not stored names: {spec[names]!r}")
    if ("fields" in spec or spec.get("seq") == "namedtuple") and "type" not in spec:
        raise ValueError(f"not a stored value: {spec!r}")
    for item in spec.get("items", ()):
        check_spec(item, count)


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


def position_multipliers(count: int, device: torch.device, first: int = 0) -> Tensor:
    """The odd pseudo-random 64-bit multipliers of the word positions ``first + 1`` to ``first + count`` (the same
    on every device): the high 31 bits from splitmix64's first steps, the low 33 bits ``2 * p(position) + 1``, where
    ``p`` is a bijection of ``[0, 2**31)`` (multiply-xorshift). So no two positions below ``2**31`` have multipliers
    equal or opposite modulo ``2**33``, which is what makes two flipped signs always seen (see :func:`word_hash`).
    Kept per first position, count and device while they take at most 64 MiB in all (the positions of a sample's
    tensors of up to 32 MB: each takes the positions after the previous one's)."""
    key = (first, count, device)
    cached = _multipliers_cache.get(key)
    if cached is not None:
        return cached
    position = torch.arange(first + 1, first + count + 1, dtype=torch.int64, device=device)
    m = position * _GOLDEN
    m = (m ^ ((m >> 31) & _MASK32)) * _MIX
    low = (position & _MASK31) * _SPREAD1 & _MASK31  # each step a bijection of [0, 2**31)
    low ^= low >> 16
    low = low * _SPREAD2 & _MASK31
    low ^= low >> 15
    multipliers = (m & _HIGH31) | (low * 2 + 1)
    global _multipliers_bytes
    if 8 * count <= _MULTIPLIERS_KEPT:  # larger ones (never a block of word_hash's) are made for this call only
        if _multipliers_bytes + 8 * count > _MULTIPLIERS_KEPT:
            _multipliers_cache.clear()
            _multipliers_bytes = 0
        _multipliers_cache[key] = multipliers
        _multipliers_bytes += 8 * count
    return multipliers


def word_hash(words: Tensor, constant: Optional[Tensor] = None, first: int = 0) -> Tensor:
    """A 64-bit checksum of each row of the ``int32`` matrix ``words``, plus ``constant`` (a 0-d ``int64`` tensor on
    ``words``' device): the words, sign-extended to 64 bits, times odd pseudo-random multipliers of their positions
    ``first + 1`` onwards (:func:`position_multipliers`), summed modulo 2**64 (one widening and one integer matrix-vector product on the
    CPU, per block of columns of about 8 MiB widened; products and a sum on other devices; integer sums are exact in
    any order, so every device and block size gives the same).

    A changed word (so any change of one byte) always changes the checksum: the difference is non-zero and below
    2**32 in magnitude, and an odd multiplier keeps it non-zero modulo 2**64. So do two words changed only in their
    top bit (two flipped float32 signs): that needs two multipliers equal or opposite modulo 2**33, which no two
    positions below 2**31 have. Any other change, reordered words included, is missed only if its products cancel
    exactly: at most about 2**-32 for a given change over pseudo-random multipliers, far less for most.

    Example::

        >>> words = torch.tensor([[1, 2, 3], [1, 2, 3], [3, 2, 1]], dtype=torch.int32)
        >>> h = word_hash(words)
        >>> bool(h[0] == h[1]), bool(h[0] == h[2])
        (True, False)
    """
    rows, width = words.shape
    # columns widened at a time: a batch of large images is hashed in blocks of columns (the sum is linear), so the
    # widened copy and the multipliers take a few MiB at most (beyond 1048576 rows, one column: 8 bytes a row)
    step = max(1, min(_BLOCK_COLUMNS, _WIDENED_BYTES // (8 * max(rows, 1))))
    total = constant
    for start in range(0, width, step):
        block = words if step >= width else words[:, start:start + step]
        factors = position_multipliers(block.shape[1], words.device, first=first + start)
        wide = block.to(torch.int64)
        if wide.device.type == "cpu":  # integer arithmetic wraps: the sum modulo 2**64
            total = torch.mv(wide, factors) if total is None else torch.addmv(total, wide, factors)
        else:  # integer matrix-vector products are CPU-only
            part = (wide * factors).sum(-1)
            total = part if total is None else total + part
    if total is None or total.dim() == 0:  # rows of no words: only the constant
        zeros = torch.zeros(rows, dtype=torch.int64, device=words.device)
        return zeros if total is None else zeros + total
    return total


def row_hash(words: Tensor) -> Tensor:
    """:func:`word_hash` of each row of the ``int64`` matrix ``words`` (last stride 1), read as its 32-bit halves,
    so that one changed byte always changes it (about 0.1 ms for 256 rows of 512 float32 values on one CPU thread).

    Example::

        >>> words = torch.tensor([[1, 2, 3], [1, 2, 3], [3, 2, 1]])
        >>> h = row_hash(words)
        >>> bool(h[0] == h[1]), bool(h[0] == h[2])
        (True, False)
    """
    return word_hash(words.view(torch.int32))


def flatten_named(value: Any, leaves: list[Tensor], names: list[str], where: str) -> Any:
    """:func:`flatten`, with ``where`` (the teacher's output or the layer) added to ``names`` for each leaf it adds."""
    spec = flatten(value, leaves, where)
    names += [where] * (len(leaves) - len(names))
    return spec


def rows_problem(leaves: Sequence[Tensor], names: Sequence[str], rows: int) -> Optional[StageProblem]:
    """The problem of a batch's tensors that do not have one row per sample (``rows``), or ``None``.

    Example::

        >>> rows_problem([torch.ones(3, 2)], ["output of teacher 't'"], rows=4).message
        'has shape (3, 2) but the batch has 4 sample indices; the cache needs one row per sample'
    """
    for leaf, name in zip(leaves, names):
        if leaf.layout != torch.strided or leaf.is_nested:  # no rows of bytes to store
            kind = "nested" if leaf.is_nested else str(leaf.layout).replace("torch.", "")
            return StageProblem(f"is a {kind} tensor, which the cache cannot store; make it dense (`.to_dense()`, "
                                "or padded) in the teacher's output", name="teacher_cache", field=name, value=kind)
        if leaf.is_quantized:  # its bytes are not its values, and it cannot be stored or rebuilt as it is
            return StageProblem("is a quantized tensor, which the cache cannot store; dequantize it "
                                "(`.dequantize()`) in the teacher's output", name="teacher_cache", field=name,
                                value=str(leaf.dtype))
        if leaf.dim() == 0 or leaf.shape[0] != rows:
            return StageProblem(f"has shape {tuple(leaf.shape)} but the batch has {rows} sample indices; the cache needs "
                                "one row per sample", name="teacher_cache", field=name, value=tuple(leaf.shape))
    return None
