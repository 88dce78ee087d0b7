"""Rows of a :class:`~lightning_stages.TeacherCache` in files that any number of processes share.

:class:`FileRows` is built so that concurrency and kills cannot make it serve a wrong value:

* one subdirectory per key (``tc2-<key>``): other teachers, versions or dtypes never share a file;
* each process appends to a shard file of its own (unique name; its header is written to a temporary file and
  renamed, so a shard always has a complete header), and never rewrites or truncates a byte;
* every record carries a checksum of its sample index, input fingerprint and data, checked on every read: a torn,
  truncated, missing or damaged record is never served, and is recomputed;
* a process holds a lock file in its key's subdirectory while it uses it (released by the OS when the process dies);
  subdirectories of other keys that no live process holds are deleted, under a lock on the whole directory. A
  deletion cut short leaves shards that are each still complete or detectably incomplete.
* a subdirectory deleted or moved while a process uses it (its shard is no longer at its path, one ``stat`` per
  stored batch) is made again, with a warning: rows are never appended to a file that no later run can find.

Rows are read through read-only memory maps (as fast as LMDB's ``get`` here); like any memory-mapped store, a shard
truncated by hand while a process reads it can stop that process (SIGBUS), never make it read a wrong value.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from typing import Any, Optional, cast

import torch
from filelock import FileLock
from torch import Tensor

from lightning_stages.distillation.teacher_cache_directory import (
    directory_lock,
    remove_file,
    share_like_directory,
    tidy,
)
from lightning_stages.distillation.teacher_cache_rows import row_hash
from lightning_stages.distillation.teacher_cache_shards import ROW_HEAD, Shard, align8, header_bytes, read_header
from lightning_stages.distillation.teacher_cache_storage import NoRows, RowStorage, leaf_specs

__all__ = ["FileRows", "open_rows"]

def open_rows(directory: str, key: str, again: bool = False) -> RowStorage:
    """:class:`FileRows` of ``key`` in ``directory``. ``again``: the directory was in use earlier in this process
    (the teachers changed, or the cache was cleared); if it cannot be opened now (made read-only, a full disk), that
    is warned about as a write that fails, and the rows of this key are neither stored nor read (:class:`NoRows`):
    training goes on, the teachers running at every step.

    Raises:
        OSError: the directory cannot be created or written, unless ``again``.
    """
    try:
        return FileRows(directory, key)
    except OSError as err:
        if not again:
            raise
        warnings.warn(f"teacher cache: cannot use {directory} for the teachers as they are now ({err}); training goes "
                      "on, and the teachers run at every step until they change again", stacklevel=3)
        return NoRows()


class FileRows(RowStorage):
    """Rows in append-only shard files under ``directory/tc2-<key>/``, shared by any number of processes.

    Args:
        directory: the cache directory (created if missing).
        key: 32 hex digits naming what the rows were computed by (teachers, layers, version, stored dtype).

    Raises:
        OSError: the directory cannot be created or written.
    """

    def __init__(self, directory: str, key: str) -> None:
        self.layout = None
        directory = os.path.abspath(directory)  # the same directory after an os.chdir
        self.directory, self.key = directory, key
        self.path = os.path.join(directory, f"tc2-{key}")
        self._salt = int(key[:16], 16) - (1 << 63)
        self._id = f"{os.getpid()}-{uuid.uuid4().hex}"
        self._shards: dict[str, Shard] = {}
        self._bad: set[str] = set()
        self._where: dict[int, tuple[Shard, int, int]] = {}  # sample -> (shard, record, input fingerprint)
        self._writer: Optional[Shard] = None
        self._writer_fd: Optional[int] = None
        self._unwritable = False  # a write failed (disk full, no permission): warned once
        self._moved = False  # the key's subdirectory was deleted or moved while in use: warned once
        self._appended, self._grows = 0, False  # records this object appended; warned once: far more than samples
        self._enter()
        self._scan()

    def _enter(self) -> None:
        """Drop the keys nobody uses (first: on a full disk their space makes room for this one), create the key's
        subdirectory and hold this process's lock file in it."""
        os.makedirs(self.directory, exist_ok=True)
        with directory_lock(self.directory):
            tidy(self.directory, self.path)
            if not os.path.isdir(self.path):
                remove_file(self.path)
            os.makedirs(self.path, exist_ok=True)
            share_like_directory(self.path, self.directory)
            self._live = FileLock(os.path.join(self.path, self._id + ".live"), timeout=0, thread_local=False)
            self._live.acquire()

    def _enter_again(self) -> None:
        """The key's subdirectory, or this process's lock file in it, was deleted or moved while in use: forget its
        rows and enter it again (made anew), so that rows are stored where the next run looks, never lost."""
        if not self._moved:
            warnings.warn(f"teacher cache: {self.path} was deleted or moved during the run; it is made again, and "
                          "its rows are computed again when next needed", stacklevel=2)
        self._moved = True
        self._close_writer()
        with contextlib.suppress(OSError, AttributeError):
            self._live.release()
        self._shards, self._bad, self._where = {}, set(), {}
        self._appended = 0  # counted against the rows of the directory made again (the growth warning)
        self._enter()

    def __len__(self) -> int:
        return len(self._where)

    def set_layout(self, layout: dict[str, Any]) -> None:
        if layout == self.layout:
            return
        self.layout, self._where = layout, {}
        self._close_writer()
        for shard in self._shards.values():
            shard.count = 0
        self._scan()

    def _scan(self) -> None:
        """Index the records that other processes (or earlier runs) appended since the last scan."""
        try:
            names = sorted(os.listdir(self.path))
        except OSError:
            return
        for name in names:
            path = os.path.join(self.path, name)
            own = self._writer is not None and path == self._writer.path
            if not name.endswith(".rows") or path in self._bad or own:
                continue
            shard = self._shards.get(path) or read_header(path, self.key)
            if shard is None:
                self._bad.add(path)
                continue
            self._shards[path] = shard
            if self.layout is None:
                self.layout = shard.layout
            if shard.layout == self.layout:
                self._index(shard)

    def _index(self, shard: Shard) -> None:
        try:
            count = max(0, (os.stat(shard.path).st_size - shard.offset) // shard.record_bytes)
        except OSError:
            return
        chunk = max(1, (4 << 20) // shard.record_bytes)  # records read at once
        for first in range(shard.count, count, chunk):
            found = shard.rows(list(range(first, min(first + chunk, count))))
            if found is None:
                return
            words = torch.from_numpy(found).view(torch.int64)
            for k in self._intact(words).nonzero().flatten().tolist():  # a torn or damaged record is not indexed
                self._where[int(words[k, 1])] = (shard, first + k, int(words[k, 2]))
            shard.count = first + len(words)

    def _intact(self, words: Tensor) -> Tensor:
        return words[:, 0] == row_hash(words[:, 1:]) + self._salt

    def get(self, index: list[int], fingerprints: Optional[Tensor],
            index_tensor: Optional[Tensor] = None) -> tuple[Optional[list[Tensor]], int]:
        entries = [self._where.get(i) for i in index]
        if None in entries or self.layout is None:
            self._scan()
            entries = [self._where.get(i) for i in index]
        wanted = fingerprints.tolist() if fingerprints is not None else None
        mismatched = 0 if wanted is None else sum(e is not None and e[2] != f for e, f in zip(entries, wanted))
        if None in entries or mismatched or self.layout is None:
            return None, mismatched
        specs = leaf_specs(self.layout)
        record_bytes = ROW_HEAD + sum(align8(n) for _, _, n in specs)
        rows = torch.empty((len(index), record_bytes), dtype=torch.uint8)
        groups: dict[Shard, tuple[list[int], list[int]]] = {}
        for position, (shard, record, _) in enumerate(entries):  # type: ignore[misc]
            positions, records = groups.setdefault(shard, ([], []))
            positions.append(position)
            records.append(record)
        for shard, (positions, records) in groups.items():
            found = shard.rows(records)
            if found is None:  # the file is gone or shorter: recompute
                for i, entry in zip(index, entries):
                    if entry[0] is shard and self._where.get(i) is entry:  # type: ignore[index]
                        del self._where[i]
                return None, 0
            rows.numpy()[positions] = found
        words = rows.view(torch.int64)
        intact = self._intact(words) & (words[:, 1] == torch.tensor(index, dtype=torch.int64))
        if fingerprints is not None:  # an intact record stored since for another input of the sample: recompute
            intact &= words[:, 2] == fingerprints
        if not bool(intact.all()):
            for k in (~intact).nonzero().flatten().tolist():
                if self._where.get(index[k]) is entries[k]:
                    del self._where[index[k]]  # damaged: never served, recomputed by the caller
            return None, 0
        leaves, start = [], ROW_HEAD
        for shape, dtype, nbytes in specs:
            # a copy that starts the storage, aligned for any dtype (a one-row slice is contiguous at offset 24)
            if not nbytes:  # a leaf of no elements per sample, (N, 0): nothing stored, nothing to view
                leaves.append(torch.empty((len(index), *shape), dtype=dtype))
                continue
            leaf = rows[:, start:start + nbytes].clone(memory_format=torch.contiguous_format)
            leaves.append(leaf.view(dtype).view(len(index), *shape))
            start += align8(nbytes)
        return leaves, 0

    def put(self, index: list[int], fingerprints: Tensor, leaves: list[Tensor]) -> None:
        if self.layout is None:
            raise RuntimeError("set_layout before put")
        specs = leaf_specs(self.layout)
        record_bytes = ROW_HEAD + sum(align8(n) for _, _, n in specs)
        rows = torch.zeros((len(index), record_bytes), dtype=torch.uint8)
        words = rows.view(torch.int64)
        words[:, 1] = torch.tensor(index, dtype=torch.int64)
        words[:, 2] = fingerprints
        start = ROW_HEAD
        for (_, _, nbytes), leaf in zip(specs, leaves):
            if nbytes:
                flat = leaf.reshape(len(index), -1).contiguous()
                rows[:, start:start + nbytes] = (flat.to(torch.uint8) if flat.dtype == torch.bool else flat).view(
                    torch.uint8)
            start += align8(nbytes)
        words[:, 0] = row_hash(words[:, 1:]) + self._salt
        data = memoryview(rows.numpy()).cast("B")  # type: ignore[arg-type]
        try:
            if self._writer is not None and not self._in_place():
                self._enter_again()  # its directory was deleted or moved: rows appended there would be lost
            if self._writer is None:
                self._open_writer(record_bytes)
            written = 0
            while written < len(data):
                written += os.write(self._writer_fd, data[written:])  # type: ignore[arg-type]
        except OSError as err:
            self._close_writer()  # a torn record stays at the end of this shard, never read; the next put starts anew
            if not self._unwritable:
                warnings.warn(f"teacher cache: cannot write to {self.path} ({err}); training goes on, and the rows "
                              "that could not be stored are computed again when next needed", stacklevel=2)
            self._unwritable = True
            return
        writer = cast(Shard, self._writer)  # opened above
        for k, (i, fingerprint) in enumerate(zip(index, fingerprints.tolist())):
            self._where[i] = (writer, writer.count + k, fingerprint)
        writer.count += len(index)
        self._appended += len(index)
        if self._appended > 2 * len(self._where) + 256 and not self._grows:
            self._grows = True
            warnings.warn(f"teacher cache: {self._appended} rows stored in {self.path} for {len(self._where)} samples: "
                          "a sample whose input changed (random augmentation, batches reshuffled under dynamic "
                          "padding) is stored again, and the directory only grows (never compacted); use the cache "
                          "when a sample index always gives the same input", stacklevel=3)

    def _open_writer(self, record_bytes: int) -> None:
        head = header_bytes(self.key, self.layout)  # type: ignore[arg-type]
        if not os.path.exists(self._live.lock_file):
            self._enter_again()
        name = f"{self._id}-{uuid.uuid4().hex[:8]}"
        tmp, final = os.path.join(self.path, f"{self._id}.tmp"), os.path.join(self.path, f"{name}.rows")
        with open(tmp, "wb") as handle:
            handle.write(head)
        os.rename(tmp, final)  # a shard is visible only with its whole header
        self._writer_fd = os.open(final, os.O_WRONLY | os.O_APPEND)
        self._writer = self._shards[final] = Shard(final, self.layout, len(head), record_bytes)  # type: ignore[arg-type]

    def _in_place(self) -> bool:
        """Whether the writer's file is still at its path (its directory was not deleted or moved): one ``stat``.
        (By path, not by inode: some network and FUSE filesystems do not keep inode numbers stable.)"""
        return os.path.exists(self._writer.path)  # type: ignore[union-attr]

    def _close_writer(self) -> None:
        if self._writer_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._writer_fd)
        self._writer, self._writer_fd = None, None

    def close(self) -> None:
        self._close_writer()
        self._shards = {}  # their memory maps close with them
        with contextlib.suppress(OSError, AttributeError):
            self._live.release()

    def __del__(self) -> None:
        self.close()
