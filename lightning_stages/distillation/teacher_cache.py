"""``TeacherCache``: teacher outputs and hooked teacher features stored per sample (offline distillation).

The first distilling epoch runs the teachers and stores, for every sample of the batch, what they returned and
what the feature hooks captured. Later distilling epochs read those values back and skip the teachers' forward.

Samples are identified by their index in the dataset. The batch carries them: wrap the dataset in
:class:`IndexedDataset` (or return the index yourself) and pass them on as
``self.run_teachers(x, sample_index=batch_indices)``.

A stored row is served only for the input it was computed from: each row keeps a checksum of the sample's teacher
inputs, compared at every read. A different input (another dataset, random augmentation) recomputes the row and is
counted as a mismatch (:meth:`TeacherCache.take_stats`). Rows are laid out and checksummed in ``teacher_cache_rows``,
inputs checksummed in ``teacher_cache_inputs``, kept in ``teacher_cache_storage`` (memory) or ``teacher_cache_files``
(files shared by processes, in a directory tidied by ``teacher_cache_directory``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_stages.distillation.indexed_dataset import IndexedDataset
from lightning_stages.distillation.teacher_cache_directory import drop_unused
from lightning_stages.distillation.teacher_cache_files import open_rows
from lightning_stages.distillation.teacher_cache_inputs import input_checksums, sample_indices
from lightning_stages.distillation.teacher_cache_rows import flatten_named, rows_problem, too_large, unflatten
from lightning_stages.distillation.teacher_cache_storage import (
    MemoryRows,
    RowStorage,
    directory_path,
    directory_problem,
)
from lightning_stages.distillation.teacher_fingerprint import teacher_fingerprint
from lightning_stages.errors import DistillationStepError, StageConfigError, StageProblem

__all__ = ["IndexedDataset", "TeacherCache", "teacher_fingerprint"]  # the first and last: kept here for 0.1 imports

_FORMAT_VERSION = 9  # 9: every tensor of an input takes its own word positions in the checksum; 8: input and row checksums of 32-bit words times 64-bit multipliers; 7: the checksum marks where row tensors stand, mappings and shared shapes; 6: input checksums by byte_hash; 5: of every input's content and structure; 4: by word_hash; 3: container types are rebuilt (2: ModelOutputs as dicts)


def _problem(message: str, field: str, value: Any, hint: Optional[str] = None) -> StageProblem:
    return StageProblem(message, name="teacher_cache", field=field, value=value, hint=hint)


def _step_error(problem: StageProblem) -> DistillationStepError:
    return DistillationStepError(problem, when="a step")  # the mixin may re-raise it naming the stage


def _as(row: Tensor, device: Union[torch.device, str, None], dtype: torch.dtype) -> Tensor:
    """``row`` on ``device`` in ``dtype`` (itself when it is there already: the usual CPU read)."""
    there = row.dtype == dtype and (device is None or row.device == torch.device(device))
    return row if there else row.to(device=device, dtype=dtype)


def _index_tensor(sample_index: Any) -> Optional[Tensor]:
    """``sample_index`` if it is a CPU ``int64`` vector (a batch's indices, already checked), else ``None``."""
    vector = isinstance(sample_index, Tensor) and sample_index.dtype == torch.int64 and sample_index.dim() == 1
    return sample_index if vector and sample_index.device.type == "cpu" else None


class TeacherCache:
    """Stores teacher outputs and hooked teacher features per sample, so later distilling epochs skip the teachers.

    Give it to a :class:`~lightning_stages.DistillationModule` as ``teacher_cache`` (class attribute or in
    ``__init__``) and pass the batch's sample indices to ``run_teachers(..., sample_index=...)``. In training
    steps, a batch whose samples are all stored (for the same inputs) is read from the cache and the teachers do not
    run; any other batch runs the teachers and is stored. Evaluation steps (module in eval mode) always run them.

    Entries are keyed by a :func:`teacher_fingerprint` (teachers' weights and buffers, code or ``version``, hooked
    layers, teacher precision and the autocast they run under) and the stored ``dtype``; each row also keeps a
    checksum of its input. Every batch must give
    the same per-sample shapes. Values come back in the dtype the teacher produced, on the module's device.

    With a ``directory``, any number of processes (DDP ranks, several runs) may share it: each appends to files of
    its own in a subdirectory per key, every row is checksummed and checked at every read, and a killed or
    concurrent process never makes another one read a wrong value (details in ``teacher_cache_storage.py``).

    Args:
        directory: where to keep the entries (files shared by processes); ``None`` keeps them in CPU memory. A
            ``~`` is expanded and a relative path is taken from the working directory when the cache is made.
        dtype: store floating-point values in this dtype (``torch.bfloat16`` or ``torch.float16``: half the bytes
            of float32); ``None`` keeps the teacher's dtype. A value outside its range is refused when stored.
        num_samples: the dataset size: sample indices must be below it.
        version: a version of the teachers' code, used in the key instead of their source.
        store_features: ``False`` stores the teachers' outputs only: a stored batch returns them without running the
            teachers, and the hooked teacher features are computed by running the teachers on that batch when first
            read (``captured_features``, ``feature_losses``). Use it when features change shape between batches
            (dynamic padding) or are read only in some stages.

    Raises:
        StageConfigError: ``dtype``, ``num_samples``, ``version`` or ``store_features`` has the wrong type, or
            ``directory`` is not a path, is empty, is an existing file, lies under one, or is not writable.

    Example::

        >>> cache = TeacherCache(dtype=torch.float16)
        >>> cache.bind("fingerprint-1")
        False
        >>> x = torch.tensor([[0.5], [1.5]])
        >>> cache.lookup([0, 1], inputs=x) is None  # a miss: run the teacher, then store
        True
        >>> cache.store([0, 1], {"t": 2 * x}, {"t": {"layer": torch.zeros(2, 3)}}, inputs=x)
        >>> outputs, features = cache.lookup([1], inputs=x[1:])
        >>> outputs["t"], features["t"]["layer"].shape, len(cache)
        (tensor([[3.]]), torch.Size([1, 3]), 2)
        >>> cache.lookup([1], inputs=x[:1]) is None  # another input for sample 1: recomputed
        True
        >>> cache.take_stats()
        {'hits': 1, 'misses': 2, 'mismatches': 1}
        >>> cache.bind("fingerprint-2"), len(cache)  # other teachers: nothing stored for them
        (False, 0)
    """

    _opened = False  # the directory was opened in this process: opening it again may fail only with a warning

    def __init__(
        self, directory: Union[str, os.PathLike, None] = None, dtype: Optional[torch.dtype] = None,
        num_samples: Optional[int] = None, version: Optional[str] = None, store_features: bool = True,
    ) -> None:
        problems = []
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            # float8 types have no inf (e4m3fn stores inf as 448) and no index_copy_: values would be silently wrong
            problems.append(_problem("must be None, torch.float16, torch.bfloat16, torch.float32 or torch.float64",
                                     "dtype", dtype, "e.g. torch.bfloat16 or torch.float16"))
        if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                        or num_samples < 1):
            problems.append(_problem("must be None or a positive integer (the dataset size)", "num_samples",
                                     num_samples))
        if version is not None and not isinstance(version, str):
            problems.append(_problem("must be None or a string", "version", version))
        if not isinstance(store_features, bool):
            problems.append(_problem("must be True or False", "store_features", store_features))
        self.directory, wrong = directory_path(directory)  # absolute, ~ expanded; (None, None) for None
        problems += [_problem(wrong, "directory", directory)] if wrong else self._directory_problems(create=False)
        if problems:
            raise StageConfigError(problems)
        self.dtype, self.num_samples, self.version, self.store_features = dtype, num_samples, version, store_features
        self._stats = {"hits": 0, "misses": 0, "mismatches": 0}
        self._reset()

    def _reset(self) -> None:
        self._fingerprint: Optional[str] = None
        self._storage: Optional[RowStorage] = None
        self._layout: Optional[dict[str, Any]] = None  # of the rows this object stores
        #: lookups (batches) that found every sample / that did not, since the last :meth:`bind`
        self.hits = self.misses = 0

    # ------------------------------------------------------------------ pickling: configuration only

    def __getstate__(self) -> dict[str, Any]:
        # deep copies (StochasticWeightAveraging) and pickles (ddp_spawn) of the module carry the configuration,
        # never the stored values
        return {"directory": self.directory, "dtype": self.dtype, "num_samples": self.num_samples,
                "version": self.version, "store_features": self.store_features}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"version": None, "store_features": True, **state})
        self._stats = {"hits": 0, "misses": 0, "mismatches": 0}
        self._reset()

    def __repr__(self) -> str:
        where = f"directory={self.directory!r}" if self.directory is not None else "in memory"
        return f"TeacherCache({where}, dtype={self.dtype}, samples={len(self)})"

    def __len__(self) -> int:
        """How many samples are stored (for the current key)."""
        return 0 if self._storage is None else len(self._storage)

    @property
    def fingerprint(self) -> Optional[str]:
        """The fingerprint the entries belong to (``None`` before :meth:`bind`)."""
        return self._fingerprint

    def _directory_problems(self, create: bool) -> list[StageProblem]:
        problem = None if self.directory is None else directory_problem(self.directory, create)
        return [] if problem is None else [_problem(problem[0], "directory", self.directory, problem[1])]

    def check_directory(self) -> None:
        """Create ``directory`` if missing and check that files can be written in it (at setup, before a batch).

        Raises:
            StageConfigError: naming the field ``directory`` and its value: it is a file, lies under one, or is not
                writable.
        """
        if self.directory is not None and (problems := self._directory_problems(create=True)):
            raise StageConfigError(problems)

    # ------------------------------------------------------------------ binding

    def _key(self, fingerprint: Optional[str]) -> str:
        stored = None if self.dtype is None else str(self.dtype)
        text = json.dumps([_FORMAT_VERSION, fingerprint, self.version, stored, self.store_features])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def bind(self, fingerprint: str) -> bool:
        """Use the entries stored for ``fingerprint`` (with this ``version`` and ``dtype``).

        In memory, entries of another fingerprint are dropped. In ``directory``, the entries of other keys are
        deleted unless a live process uses them.

        Returns:
            Whether stored entries were found (in memory, or in ``directory`` from an earlier or concurrent run).

        Raises:
            StageConfigError: ``directory`` cannot be created or written.
        """
        if self._storage is not None and fingerprint == self._fingerprint:
            return len(self._storage) > 0
        self.close()
        self._reset()
        self._fingerprint = fingerprint
        self._storage = self._open()
        return len(self._storage) > 0

    def _open(self) -> RowStorage:
        if self.directory is None:
            return MemoryRows()
        if not self._opened:  # its first use: a directory that cannot be used is an error (later: warned, open_rows)
            self.check_directory()
        try:
            storage = open_rows(self.directory, self._key(self._fingerprint), again=self._opened)
        except OSError as err:
            raise StageConfigError(_problem(f"cannot be used: {err}", "directory", self.directory)) from err
        self._opened = True
        return storage

    def clear(self) -> None:
        """Drop every entry: in ``directory``, delete the files of every key that no live process uses."""
        fingerprint, bound = self._fingerprint, self._storage is not None
        self.close()
        if self.directory is not None and os.path.isdir(self.directory):
            drop_unused(self.directory)
        self._reset()
        if bound:
            self.bind(fingerprint)  # type: ignore[arg-type]

    def close(self) -> None:
        """Release the files and locks this cache holds (nothing is deleted); the next use opens them again."""
        if self._storage is not None:
            self._storage.close()
        self._storage = None

    def _bound(self) -> RowStorage:
        if self._storage is None:
            self._storage = self._open()
        return self._storage

    def take_stats(self) -> dict[str, int]:
        """Samples served (``hits``), computed because not stored or damaged (``misses``), and computed because
        stored for another input (``mismatches``) since the last call; the counters restart from zero."""
        stats, self._stats = self._stats, {"hits": 0, "misses": 0, "mismatches": 0}
        return stats

    # ------------------------------------------------------------------ read and write

    def _miss(self, rows: int, mismatched: int = 0) -> Optional[tuple[dict, dict]]:
        self.misses, self._stats["misses"] = self.misses + 1, self._stats["misses"] + rows - mismatched
        self._stats["mismatches"] += mismatched
        return None

    def lookup(self, sample_index: Any, device: Union[torch.device, str, None] = None,
               inputs: Any = None) -> Optional[tuple[dict, dict]]:
        """The stored outputs and features of the samples ``sample_index``, or ``None`` unless all are stored.

        Args:
            sample_index: the batch's dataset indices.
            device: where to put the values (default: CPU).
            inputs: the teachers' inputs for this batch (e.g. ``(args, kwargs)``); rows stored for other inputs
                are not served. ``None`` skips this check.

        Returns:
            ``({teacher: output}, {teacher: {layer path: feature}})``, batched in the order of ``sample_index``,
            in the dtype the teacher produced, on ``device``, in the containers stored; the features are ``{}``
            with ``store_features=False``.

        Raises:
            DistillationStepError: an index is negative, not an integer, or not below ``num_samples``.
        """
        index = sample_indices(sample_index, self.num_samples)
        if (self._fingerprint is None and self._storage is None) or not index:  # never bound: nothing stored
            return self._miss(len(index))
        storage = self._bound()
        fingerprints = None if inputs is None else input_checksums(inputs, len(index))
        rows, mismatched = storage.get(index, fingerprints, _index_tensor(sample_index))
        layout = storage.layout
        if rows is None or layout is None:
            return self._miss(len(index), mismatched)
        leaves = [_as(r, device, getattr(torch, d)) for r, (_, d) in zip(rows, layout["leaves"])]
        try:
            outputs = {name: unflatten(spec, leaves) for name, spec in layout["outputs"].items()}
            features = {name: {path: unflatten(spec, leaves) for path, spec in paths.items()}
                        for name, paths in layout["features"].items()}
        except LookupError:  # a container class that this process has not imported: run the teachers instead
            return self._miss(len(index))
        self.hits, self._stats["hits"] = self.hits + 1, self._stats["hits"] + len(index)
        return outputs, features

    def store(self, sample_index: Any, outputs: Mapping[str, Any], features: Mapping[str, Mapping[str, Any]],
              inputs: Any = None) -> None:
        """Store the teachers' ``outputs`` and hooked ``features`` of a batch, row ``i`` for ``sample_index[i]``.

        Args:
            inputs: the teachers' inputs for this batch, as given to :meth:`lookup`.

        Raises:
            DistillationStepError: a bad index (see :meth:`lookup`); the batch's tensors do not have one row per
                sample index, or their per-sample shapes or structure differ from the stored ones; a value does not
                fit ``dtype`` (e.g. above 65504 for float16).
            StageConfigError: a value is not a container the cache rebuilds (naming the teacher or layer and its type).
        """
        index = sample_indices(sample_index, self.num_samples)
        leaves: list[Tensor] = []
        names: list[str] = []  # the output or feature of each leaf, for messages
        layout: dict[str, Any] = {
            "outputs": {name: flatten_named(value, leaves, names, f"output of teacher {name!r}")
                        for name, value in outputs.items()},
            "features": {name: {path: flatten_named(value, leaves, names, f"feature {name}.{path}")
                                for path, value in paths.items()}
                         for name, paths in features.items()} if self.store_features else {},
        }
        if (problem := rows_problem(leaves, names, len(index))) is not None:
            raise _step_error(problem)
        stored = [self.dtype if self.dtype is not None and leaf.is_floating_point() else leaf.dtype for leaf in leaves]
        layout["leaves"] = [[list(leaf.shape[1:]), str(leaf.dtype).replace("torch.", "")] for leaf in leaves]
        layout["stored"] = [str(dtype).replace("torch.", "") for dtype in stored]
        if self._layout is not None and layout != self._layout:
            raise _step_error(_problem("changed between batches (structure, per-sample shape or dtype); the cache "
                                       "needs the same per-sample shapes for every batch", "teacher outputs",
                                       layout["leaves"], f"stored: {self._layout['leaves']}"))
        for leaf, dtype in zip(leaves, stored):
            if (largest := too_large(leaf, dtype)) is not None:
                raise _step_error(_problem(
                    f"cannot hold a teacher value of magnitude {largest:.6g} (its largest is {torch.finfo(dtype).max:.6g})"
                    ": it would be stored as inf", "dtype", str(dtype).replace("torch.", ""),
                    "use dtype=torch.bfloat16 (float32's range in 2 bytes) or dtype=None"))
        storage = self._bound()
        if storage.layout != layout:  # files may hold rows of another layout (e.g. other input sizes)
            storage.set_layout(layout)
        self._layout = layout
        if index:
            storage.put(index, input_checksums(inputs, len(index)),
                        [leaf.detach().resolve_conj().resolve_neg().to(device="cpu", dtype=dtype)  # values, not views
                         for leaf, dtype in zip(leaves, stored)])
