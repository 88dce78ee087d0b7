"""One shard file of a :class:`~lightning_stages.TeacherCache` directory: its header and its records.

A shard is written by one process: a header (magic, length, CRC-32, then JSON naming the format, the key, the row
layout and the record size), padded to 8 bytes, then records appended one after the other and never rewritten. Each
record is a checksum, the sample index and the input fingerprint (``int64`` each), then the leaves' bytes, each
padded to 8 bytes. The shared directory that holds the shards is
:class:`~lightning_stages.distillation.teacher_cache_files.FileRows`.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from typing import Any, Optional

import numpy as np

from lightning_stages.distillation.teacher_cache_storage import leaf_specs

__all__ = ["ROW_HEAD", "Shard", "align8", "header_bytes", "read_header", "record_bytes"]

_MAGIC = b"LSTCROW2"
_FORMAT = 3  # 3: row checksums of 32-bit words (row_hash)
_HEAD = 16  # magic (8 bytes), header length (4), header CRC-32 (4), then the JSON header
ROW_HEAD = 24  # per record: checksum, sample index, input fingerprint (int64 each), then the leaves' bytes


def align8(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


def record_bytes(layout: dict[str, Any]) -> int:
    """The bytes of one record of ``layout``.

    Raises:
        ValueError, KeyError, TypeError: the layout is not one the cache wrote."""
    return ROW_HEAD + sum(align8(n) for _, _, n in leaf_specs(layout))


class Shard:
    """One append-only file of records, written by one process."""

    def __init__(self, path: str, layout: dict[str, Any], offset: int, record_bytes: int) -> None:
        self.path, self.layout, self.offset, self.record_bytes = path, layout, offset, record_bytes
        self.count = 0  # records indexed (or, for this process's own shard, written)
        self._records: Optional[np.ndarray] = None  # the whole records mapped so far, (count, record_bytes)

    def rows(self, records: list[int]) -> Optional[np.ndarray]:
        """A copy of the records ``records``, ``(len(records), record_bytes)``; ``None`` if the file is gone or
        shorter. Read through a read-only memory map of the whole records, mapped again when the file has grown
        (no process ever truncates a shard, so the map never loses its pages)."""
        needed = max(records) + 1
        if self._records is None or len(self._records) < needed:
            try:
                count = (os.stat(self.path).st_size - self.offset) // self.record_bytes
                if count < needed:
                    return None
                with open(self.path, "rb") as handle:
                    mapped = mmap.mmap(handle.fileno(), self.offset + count * self.record_bytes,
                                       access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                return None
            self._records = np.frombuffer(mapped, dtype=np.uint8, count=count * self.record_bytes,
                                          offset=self.offset).reshape(count, self.record_bytes)
        return self._records[records]


def header_bytes(key: str, layout: dict[str, Any]) -> bytes:
    """The header of a new shard of ``key`` and ``layout``, padded to 8 bytes."""
    body = json.dumps({"format": _FORMAT, "key": key, "layout": layout,
                       "record_bytes": record_bytes(layout)}).encode()
    head = _MAGIC + len(body).to_bytes(4, "little") + zlib.crc32(body).to_bytes(4, "little") + body
    return head + bytes(align8(len(head)) - len(head))


def read_header(path: str, key: str) -> Optional[Shard]:
    """The shard at ``path`` if its header is intact and written for ``key``, else ``None`` (never raises)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD)
            length = int.from_bytes(head[8:12], "little")
            body = handle.read(length)
        if head[:8] != _MAGIC or len(body) != length or zlib.crc32(body) != int.from_bytes(head[12:16], "little"):
            return None
        meta = json.loads(body)
        if meta.get("format") != _FORMAT or meta.get("key") != key:
            return None
        layout = meta["layout"]
        if meta["record_bytes"] != record_bytes(layout):
            return None
        return Shard(path, layout, align8(_HEAD + length), meta["record_bytes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
