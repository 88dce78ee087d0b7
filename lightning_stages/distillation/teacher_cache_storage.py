"""Where a :class:`~lightning_stages.TeacherCache` keeps its rows: the :class:`RowStorage` interface and
:class:`MemoryRows`; the files shared by processes are :class:`~lightning_stages.distillation.teacher_cache_files.FileRows`.

A row is keyed by its sample index and holds that sample's stored tensors (the leaves of the layout, see
``teacher_cache_rows.py``) and the fingerprint of the input it was computed from. ``get`` gives rows only when every
requested one is stored for the same input; ``put`` stores rows.
"""

from __future__ import annotations

import abc
import functools
import os
import tempfile
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_stages.distillation.teacher_cache_rows import check_spec

__all__ = ["MemoryRows", "RowStorage", "directory_path", "directory_problem", "leaf_specs"]


def leaf_specs(layout: dict[str, Any]) -> list[tuple[tuple[int, ...], torch.dtype, int]]:
    """``(per-sample shape, stored dtype, bytes per sample)`` of each leaf of ``layout``.

    Raises:
        ValueError: the layout is not one the cache wrote (e.g. a damaged file header).
    """
    shapes, stored = layout["leaves"], layout["stored"]
    if len(shapes) != len(stored):
        raise ValueError("one stored dtype per leaf")
    specs = []
    for (shape, teacher_dtype), name in zip(shapes, stored):
        dtype = _dtype_named(name)
        if _dtype_named(teacher_dtype) is None or dtype is None or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ValueError(f"not a leaf: {shape} {teacher_dtype} {name}")
        numel = 1
        for size in shape:
            numel *= size
        specs.append((tuple(shape), dtype, numel * torch.empty((), dtype=dtype).element_size()))
    for specs_of in (layout["outputs"], *layout["features"].values()):
        for spec in specs_of.values():
            check_spec(spec, len(specs))  # raises on a spec that names no leaf
    return specs


_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


def _dtype_named(name: Any) -> Optional[torch.dtype]:
    """The dtype a layout names (``"float32"``), if it is one the cache stores (not quantized), else ``None``."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype not in _QUANTIZED else None


def directory_path(directory: Any) -> tuple[Optional[str], Optional[str]]:
    """``(the absolute path, None)`` of a ``directory`` argument (``~`` expanded, resolved against the working
    directory now, so an ``os.chdir`` later changes nothing), ``(None, what is wrong with it)``, or ``(None, None)``
    for ``None``.

    Example::

        >>> directory_path("~/kd")[0] == os.path.join(os.path.expanduser("~"), "kd"), directory_path("")
        (True, (None, 'is empty; give the path of a directory, or None to keep the values in memory'))
    """
    if directory is None:
        return None, None
    if not isinstance(directory, (str, bytes, os.PathLike)):
        return None, f"must be None or a path (str or os.PathLike), not {type(directory).__name__}"
    path = os.fsdecode(os.fspath(directory))
    if not path:
        return None, "is empty; give the path of a directory, or None to keep the values in memory"
    return os.path.abspath(os.path.expanduser(path)), None


def directory_problem(directory: str, create: bool) -> Optional[tuple[str, Optional[str]]]:
    """What makes ``directory`` unusable for a cache, as ``(message, hint)``; ``None`` if nothing.

    Without ``create`` it only looks (the path, its nearest existing ancestor); with it, it also creates the
    directory and a file in it.

    Example::

        >>> directory_problem(__file__, create=False)[0]
        'is an existing file, not a directory'
    """
    path = os.path.abspath(directory)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is an existing file" if existing == path else f"lies under the file {existing!r}"
        return f"{what}, not a directory", "give the path of a directory (it is created if missing)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"is not writable ({existing!r} is not)", None
    if create:
        try:
            os.makedirs(path, exist_ok=True)
            # a name of its own: processes of one pid (containers, the nodes of a run) may probe one directory at once
            descriptor, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
            os.close(descriptor)
            os.remove(probe)
        except OSError as err:
            return f"is not writable: {err.strerror or err}", None
    return None


class RowStorage(abc.ABC):
    """The interface of both storages. ``layout`` is ``None`` until rows of some layout are known."""

    layout: Optional[dict[str, Any]] = None

    @abc.abstractmethod
    def set_layout(self, layout: dict[str, Any]) -> None:
        """Store (and serve) rows of ``layout`` from now on; rows of another layout are forgotten."""

    @abc.abstractmethod
    def get(self, index: list[int], fingerprints: Optional[Tensor],
            index_tensor: Optional[Tensor] = None) -> tuple[Optional[list[Tensor]], int]:
        """The stored leaves of the rows ``index`` (or ``None`` unless all are stored, intact and, when
        ``fingerprints`` is given, stored for those inputs), and how many stored rows had another input.
        ``index_tensor``: the same indices as a CPU ``int64`` tensor, when the caller has one (a batch's)."""

    @abc.abstractmethod
    def put(self, index: list[int], fingerprints: Tensor, leaves: list[Tensor]) -> None:
        """Store row ``k`` of every leaf (CPU, stored dtype) for sample ``index[k]``."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many samples have a row."""

    def close(self) -> None:  # noqa: B027 - nothing to release in memory
        """Release what the storage holds (files, locks). Nothing is deleted."""


class NoRows(RowStorage):
    """Keeps nothing: every read misses (the teachers run) and a store is dropped. A directory that could not be
    opened again during a run (see :func:`~lightning_stages.distillation.teacher_cache_files.open_rows`)."""

    def set_layout(self, layout: dict[str, Any]) -> None:
        self.layout = layout

    def get(self, index: list[int], fingerprints: Optional[Tensor],
            index_tensor: Optional[Tensor] = None) -> tuple[Optional[list[Tensor]], int]:
        return None, 0

    def put(self, index: list[int], fingerprints: Tensor, leaves: list[Tensor]) -> None:
        pass

    def __len__(self) -> int:
        return 0


_HELD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.cache
def _held(dtype: torch.dtype) -> torch.dtype:
    """The dtype :class:`MemoryRows` holds the rows of a leaf of ``dtype`` in: ``dtype`` itself where the CPU copies
    and indexes it, else an integer of the same size, whose bytes those operations move (float8, and unsigned 16- to
    64-bit integers, have no ``index_copy_`` or ``cat`` on the CPU).

    Example::

        >>> _held(torch.float32), _held(torch.uint16)
        (torch.float32, torch.int16)
    """
    one, at = torch.empty(1, dtype=dtype), torch.zeros(1, dtype=torch.int64)
    try:
        torch.cat([one, one]).index_copy_(0, at, one).index_select(0, at)
    except (NotImplementedError, RuntimeError):
        return _HELD.get(one.element_size(), dtype)
    return dtype


class MemoryRows(RowStorage):
    """Rows in CPU tensors, one slot per stored sample (growing by doubling).

    While the stored sample indices are compact (the largest below 4 times their number plus 65536: a dataset's
    indices), a tensor maps each index to its slot too, so that reading a batch whose indices come as a tensor is an
    ``index_select`` per tensor read (slots, checksums, each leaf) and one comparison, with no Python work per
    sample."""

    def __init__(self) -> None:
        self.layout = None
        self._slot: dict[int, int] = {}  # sample index -> its slot
        self._used = 0  # slots given out
        self._leaves: list[Tensor] = []  # each leaf's rows, held as integers of its size (see _held)
        self._dtypes: list[torch.dtype] = []  # and the stored dtype each is read back as
        self._fingerprints = torch.zeros(0, dtype=torch.int64)
        self._table: Optional[Tensor] = None  # sample index -> slot, -1 for none; None while the indices are sparse
        self._top = 0  # 1 + the largest sample index stored

    def set_layout(self, layout: dict[str, Any]) -> None:
        if layout != self.layout:
            self.layout, self._slot, self._table, self._top, self._used = layout, {}, None, 0, 0
            specs = leaf_specs(layout)
            self._leaves = [torch.empty((0, *shape), dtype=_held(dtype)) for shape, dtype, _ in specs]
            self._dtypes = [dtype for _, dtype, _ in specs]
            self._fingerprints = torch.zeros(0, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self._slot)

    def get(self, index: list[int], fingerprints: Optional[Tensor],
            index_tensor: Optional[Tensor] = None) -> tuple[Optional[list[Tensor]], int]:
        if index_tensor is not None and self._table is not None and self.layout is not None:
            rows = self._read_by_table(index_tensor, fingerprints)
            if rows is not None:  # the usual read: every row stored, for these inputs
                return rows, 0
        slots = [self._slot.get(i, -1) for i in index]
        present = torch.tensor(slots, dtype=torch.int64)
        mismatched = 0
        if fingerprints is not None and -1 not in slots:  # the usual read: every row is stored
            stored = self._fingerprints.index_select(0, present)
            mismatched = 0 if torch.equal(stored, fingerprints) else int((stored != fingerprints).sum())
        elif fingerprints is not None:
            known = present >= 0
            mismatched = int((self._fingerprints[present[known]] != fingerprints[known]).sum())
        if self.layout is None or -1 in slots or mismatched:
            return None, mismatched
        return self._rows(present), 0

    def put(self, index: list[int], fingerprints: Tensor, leaves: list[Tensor]) -> None:
        slots = []
        for i in index:
            slot = self._slot.get(i)
            if slot is None:  # a new slot: never one of a forgotten sample's (it may hold part of a failed batch)
                slot = self._slot[i] = self._used
                self._used += 1
            slots.append(slot)
        try:
            # the caller's autocast (a bf16-mixed Trainer) must not reach torch.cat: it refuses float16 rows on the CPU
            with torch.autocast("cpu", enabled=False):
                if self._used > len(self._fingerprints):
                    capacity = max(self._used, 2 * len(self._fingerprints))
                    self._leaves = [torch.cat([old, old.new_empty((capacity - len(old), *old.shape[1:]))])
                                    for old in self._leaves]
                    self._fingerprints = torch.cat([self._fingerprints, torch.zeros(
                        capacity - len(self._fingerprints), dtype=torch.int64)])
                rows = torch.tensor(slots, dtype=torch.int64)
                for stored, leaf in zip(self._leaves, leaves):
                    stored.index_copy_(0, rows, leaf if leaf.dtype == stored.dtype else leaf.view(stored.dtype))
                self._fingerprints.index_copy_(0, rows, fingerprints)
        except BaseException:  # none of these samples keeps a row (some may hold part of this batch): all are missed
            self._forget(index)
            raise
        self._map(index, rows)

    def _forget(self, index: list[int]) -> None:
        """Drop the samples ``index``: their slots stay allocated and are never read or given again."""
        for i in index:
            self._slot.pop(i, None)
        if self._table is not None:
            known = torch.tensor([i for i in index if i < len(self._table)], dtype=torch.int64)
            self._table[known] = -1

    def _read_by_table(self, index_tensor: Tensor, fingerprints: Optional[Tensor]) -> Optional[list[Tensor]]:
        """The leaves of the rows ``index_tensor`` if every one is stored (for ``fingerprints``, if given), else
        ``None``: the read by slots then finds what is missing or stored for another input."""
        try:  # an index with no row (slot -1) or beyond the table fails the first index_select that reads it
            present = self._table.index_select(0, index_tensor)  # type: ignore[union-attr]
            stored = self._fingerprints.index_select(0, present)
        except IndexError:
            return None
        if fingerprints is not None and not torch.equal(stored, fingerprints):
            return None
        return self._rows(present)

    def _rows(self, slots: Tensor) -> list[Tensor]:
        """The rows in ``slots`` of every leaf, in its stored dtype."""
        rows = [leaf.index_select(0, slots) for leaf in self._leaves]
        return [row if row.dtype == dtype else row.view(dtype) for row, dtype in zip(rows, self._dtypes)]

    def _map(self, index: list[int], rows: Tensor) -> None:
        """Enter the slots ``rows`` of the samples ``index`` into the table (made again from the slots when it
        grows; dropped while the indices are sparse)."""
        if not index:
            return
        self._top = max(self._top, max(index) + 1)
        if self._top > 4 * len(self._slot) + 65536:  # a table would be mostly empty: the slots alone
            self._table = None
        elif self._table is not None and len(self._table) >= self._top:
            self._table[torch.tensor(index, dtype=torch.int64)] = rows
        else:
            size = self._top if self._table is None else max(self._top, 2 * len(self._table))
            self._table = torch.full((size,), -1, dtype=torch.int64)
            self._table[torch.tensor(list(self._slot), dtype=torch.int64)] = torch.tensor(list(self._slot.values()))
