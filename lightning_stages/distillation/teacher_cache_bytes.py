"""The checksum of a batch's bytes, a row per sample, that :func:`~lightning_stages.distillation.teacher_cache_inputs.
input_fingerprints` takes of the teachers' inputs at every cached step:

* :func:`byte_hash`: the 64-bit checksum of each row of an ``int8`` matrix, read as 32-bit words
  (:func:`~lightning_stages.distillation.teacher_cache_rows.word_hash`);
* :func:`plain_strides`: the strides under which such a matrix can be read as words in place;
* :func:`row_words`: how many words a row of so many bytes is read as.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_stages.distillation.teacher_cache_rows import word_hash

__all__ = ["byte_hash", "plain_strides", "row_words"]


def plain_strides(matrix: Tensor) -> Tensor:
    """A contiguous matrix with the strides ``(columns, 1)``, a view of the same memory. A contiguous tensor's
    dimension of size 1 may have any stride (``x.t()`` of an ``(n, 1)`` ``x``), and ``view`` to another dtype
    refuses a last stride other than 1."""
    if matrix.stride() == (matrix.shape[1], 1):
        return matrix
    return matrix.as_strided(matrix.shape, (matrix.shape[1], 1))


def byte_hash(data: Tensor, constant: Optional[Tensor] = None, first: int = 0) -> Tensor:
    """A 64-bit checksum of each row of the contiguous ``int8`` matrix ``data`` (a batch's bytes, a row per sample),
    plus ``constant`` (a 0-d ``int64`` tensor on ``data``'s device); its words take the positions after ``first``
    (:func:`row_words` words a row).

    The row's bytes are read in place as little-endian 32-bit words (zero bytes added at the end of a row whose length
    is not a multiple of 4, or that does not start at a multiple of 4, in a copy) and hashed by
    :func:`~lightning_stages.distillation.teacher_cache_rows.word_hash`: one changed byte, or two flipped
    float32 signs, always change the checksum; any other change is missed only by a coincidence of at most about
    2**-32. The row's length is not in
    it (the caller adds the row shape). About 0.1 to 0.2 ms for 256 rows of 512 float32 values on one CPU thread,
    whatever the CPU's instruction set.

    Example::

        >>> data = torch.tensor([[1, 2, 3], [1, 2, 3], [3, 2, 1]], dtype=torch.int8)
        >>> h = byte_hash(data)
        >>> bool(h[0] == h[1]), bool(h[0] == h[2])
        (True, False)
    """
    width = data.shape[1]
    if width % 4 or data.storage_offset() % 4:  # a copy padded with zero bytes, which starts its own storage
        data = F.pad(data, (0, -width % 4))
    return word_hash(plain_strides(data).view(torch.int32), constant, first)


def row_words(row_bytes: int) -> int:
    """How many 32-bit words :func:`byte_hash` reads from a row of ``row_bytes`` bytes (zero bytes added up to a
    multiple of 4).

    Example::

        >>> row_words(8), row_words(9)
        (2, 3)
    """
    return -(-row_bytes // 4)
