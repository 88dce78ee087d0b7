"""The checksum of a batch's bytes, a row per sample, that :func:`~lightning_stages.distillation.teacher_cache_inputs.
input_fingerprints` takes of the teachers' inputs at every cached step:

* :func:`byte_hash`: the 64-bit checksum of each row of an ``int8`` matrix;
* :func:`byte_sums`: its exact partial sums, one integer matrix product (``torch._int_mm``, checked once per device
  type against :func:`products_and_sums`, which any device runs);
* :func:`byte_multipliers`: the ``int8`` multipliers of those sums.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_stages.distillation.teacher_cache_rows import position_multipliers

__all__ = ["byte_hash", "byte_multipliers", "byte_sums", "padded_int_mm", "plain_strides", "products_and_sums"]

_CHUNK = 1 << 15  # bytes per partial sum: 32768 * 255 * 127 < 2**31, so no int32 sum can overflow, even with the
# unsigned-times-signed byte products some CPU kernels use on the way
_SUMS = 8  # partial sums per chunk of bytes
_byte_multipliers: dict[torch.device, Tensor] = {}  # per device: the multipliers of every position of a chunk
_first_rows: dict[tuple[torch.device, int], Tensor] = {}  # per device and count: the first rows of that table (a view)


def byte_multipliers(count: int, device: torch.device) -> Tensor:
    """The ``(count, 8)`` ``int8`` multipliers of :func:`byte_hash` for ``count <= 32768`` byte positions, the same on
    every device: column 0 is 1, columns 1-3 the base-127 digits of the position plus 1, columns 4-7 pseudo-random,
    column 6 made odd or even so that the even columns of a row add up to an odd number. A position's multipliers do
    not depend on ``count``: they are the first rows of one table per device, made once.

    No entry is 0 and no two rows are equal, so that changing one byte, or two bytes, always changes the sums; the
    odd sum of the even columns makes a changed byte always change :func:`byte_hash` itself (see there).

    Example::

        >>> byte_multipliers(3, torch.device("cpu"))[:, :4].tolist()
        [[1, 1, 1, 1], [1, 2, 1, 1], [1, 3, 1, 1]]
    """
    rows = _first_rows.get((device, count))  # the usual call: the same count at every step, no slicing
    if rows is not None:
        return rows
    table = _byte_multipliers.get(device)
    if table is None:
        position = torch.arange(_CHUNK, dtype=torch.int64)
        digits = [position // 127**k % 127 + 1 for k in range(3)]  # 1..127
        mixed = position_multipliers(_CHUNK, torch.device("cpu"))  # pseudo-random 64-bit words
        noise = [((mixed >> (8 * k + 8)) & 0xFF) % 254 - 127 for k in range(4)]  # -127..126
        noise = [torch.where(n >= 0, n + 1, n) for n in noise]  # -127..-1, 1..127
        columns = torch.stack([torch.ones_like(position), *digits, *noise], dim=1)
        even = columns[:, 0::2].sum(1) % 2 == 0
        column6 = columns[:, 6]
        columns[:, 6] = torch.where(even, torch.where(column6 == -1, -2, torch.where(column6 == 127, 126, column6 + 1)),
                                    column6)
        table = _byte_multipliers[device] = columns.to(torch.int8).to(device)
    if len(_first_rows) > 64:  # row lengths of many different inputs: keep the views few
        _first_rows.clear()
    rows = _first_rows[(device, count)] = table[:count]
    return rows


_int_mm_works: dict[str, bool] = {}  # per device type: whether torch._int_mm gave the exact sums there


def _int_mm_checked(kind: str, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` runs on this device type and gives the sums :func:`products_and_sums` gives, tried
    once per process on a fixed 17 x 40 matrix (a kernel that gives other numbers would make every checksum wrong)."""
    works = _int_mm_works.get(kind)
    if works is None:
        works = False
        if hasattr(torch, "_int_mm"):
            probe = (torch.arange(17 * 40).reshape(17, 40) * 37 % 255 - 127).to(torch.int8).to(device)
            multipliers = byte_multipliers(40, device)
            try:
                got = torch._int_mm(probe, multipliers) if kind == "cpu" else padded_int_mm(probe, multipliers)
                works = got.dtype == torch.int32 and torch.equal(got, products_and_sums(probe, multipliers))
            except (RuntimeError, NotImplementedError):
                works = False
        _int_mm_works[kind] = works
    return works


def plain_strides(matrix: Tensor) -> Tensor:
    """A contiguous matrix with the strides ``(columns, 1)``, a view of the same memory. A contiguous tensor's
    dimension of size 1 may have any stride (``x.t()`` of an ``(n, 1)`` ``x``): ``view(torch.int8)`` refuses a last
    stride other than 1, and the CPU's ``torch._int_mm`` (oneDNN) takes a row stride below the row length as the row
    length, refuses silently and leaves its output unwritten (pytorch/pytorch#195066)."""
    if matrix.stride() == (matrix.shape[1], 1):
        return matrix
    return matrix.as_strided(matrix.shape, (matrix.shape[1], 1))


def byte_sums(data: Tensor) -> Tensor:
    """``data @ byte_multipliers`` for an ``int8`` matrix of at most 32768 columns: ``(rows, 8)`` ``int32`` sums, exact
    (no sum can overflow), so every device and kernel gives the same numbers."""
    data = plain_strides(data)
    multipliers = byte_multipliers(data.shape[1], data.device)
    kind = data.device.type
    if _int_mm_checked(kind, data.device):
        try:  # one integer matrix product (VNNI on the CPU, cuBLASLt on CUDA)
            return torch._int_mm(data, multipliers) if kind == "cpu" else padded_int_mm(data, multipliers)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError):  # not on this device or build: the same sums below, from then on
            _int_mm_works[kind] = False
    return products_and_sums(data, multipliers)


def padded_int_mm(data: Tensor, multipliers: Tensor) -> Tensor:
    """``torch._int_mm`` with the shapes CUDA's takes (more than 16 rows, a multiple of 8 columns): zero rows and
    bytes added, which add nothing to the sums, and the added rows' sums dropped."""
    rows, width = data.shape
    extra_rows, extra_width = max(0, 17 - rows), -width % 8
    if extra_rows or extra_width:
        data = F.pad(data, (0, extra_width, 0, extra_rows))
        multipliers = F.pad(multipliers, (0, 0, 0, extra_width))
    return torch._int_mm(data, multipliers)[:rows]


def products_and_sums(data: Tensor, multipliers: Tensor) -> Tensor:
    """:func:`byte_sums` on any device: per column a product and a sum in ``int32`` (exact: no sum can overflow), so
    that the extra memory is four times the data's, one column at a time."""
    columns = multipliers.to(torch.int32)
    return torch.stack([torch.sum(data * columns[:, k], dim=-1, dtype=torch.int32) for k in range(_SUMS)], 1)


def byte_hash(data: Tensor, constant: Optional[Tensor] = None) -> Tensor:
    """A 64-bit checksum of each row of the contiguous ``int8`` matrix ``data`` (a batch's bytes, a row per sample),
    plus ``constant`` (a 0-d ``int64`` tensor on ``data``'s device, added in the same operation on the CPU).

    Each 32 KiB chunk of a row gives 8 exact sums of its bytes times :func:`byte_multipliers` (one integer matrix
    product); the sums, read as 64-bit words, are summed times odd multipliers of their positions (one
    matrix-vector product), modulo 2**64. Changing one byte of a row always changes its checksum: its low 32 bits
    are the bytes times odd numbers (the even columns of :func:`byte_multipliers` add up to an odd number, the
    multipliers are odd), modulo 2**32. Two changed bytes always change the sums; reordered bytes and chunks change
    the checksum too. About 0.07 ms for 256 rows of 512 float32 values on one thread, against 0.08 ms for a copy.

    Example::

        >>> data = torch.tensor([[1, 2, 3], [1, 2, 3], [3, 2, 1]], dtype=torch.int8)
        >>> h = byte_hash(data)
        >>> bool(h[0] == h[1]), bool(h[0] == h[2])
        (True, False)
    """
    rows, width = data.shape
    if width > _CHUNK:  # whole chunks (zero bytes add nothing), a row of partial sums per chunk
        if width % _CHUNK:
            data = torch.cat([data, data.new_zeros(rows, _CHUNK - width % _CHUNK)], dim=1)
        data = data.reshape(-1, _CHUNK)
    words = byte_sums(data).reshape(rows, -1).view(torch.int64)  # two sums per 64-bit word
    multipliers = position_multipliers(words.shape[1], words.device)
    if words.device.type == "cpu":
        # integer arithmetic wraps: the sum modulo 2**64
        return torch.mv(words, multipliers) if constant is None else torch.addmv(constant, words, multipliers)
    hashed = (words * multipliers).sum(-1)  # integer matrix-vector products are CPU-only
    return hashed if constant is None else hashed + constant
