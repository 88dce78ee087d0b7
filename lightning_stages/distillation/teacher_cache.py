"""``TeacherCache``: teacher outputs and hooked teacher features stored per sample (offline distillation).

The first distilling epoch runs the teachers and stores, for every sample of the batch, what they returned and
what the feature hooks captured. Later distilling epochs read those values back and skip the teachers' forward.

Samples are identified by their index in the dataset. The batch carries them: wrap the dataset in
:class:`IndexedDataset` (or return the index yourself) and pass them on as
``self.run_teachers(x, sample_index=batch_indices)``.

Limit: the cache stores what the teacher computed for the inputs of the first distilling epoch. With random data
augmentation, later epochs see other inputs and the cached outputs no longer match them. Use the cache only with
deterministic inputs per sample index (no random augmentation, or augmentation applied after the teacher).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_stages.errors import StageConfigError, StageProblem

__all__ = ["IndexedDataset", "TeacherCache", "teacher_fingerprint"]

_FORMAT_VERSION = 1
_META_FILE = "teacher_cache.json"
_FILLED_FILE = "filled.bin"


def teacher_fingerprint(
    teachers: Mapping[str, nn.Module], feature_layers: Optional[Mapping[str, Sequence[str]]] = None, extra: Any = None
) -> str:
    """A hash of the teachers' weights (and buffers), the hooked feature layers and ``extra``.

    Two fingerprints are equal only if every teacher has the same name, the same ``state_dict`` (keys, dtypes, shapes
    and bytes) and the same hooked layers. It reads every weight once (about 20 ms per 40 MB here).

    Args:
        teachers: ``{name: module}``.
        feature_layers: ``{teacher name: [hooked submodule paths]}``.
        extra: any JSON-serialisable value that also changes the outputs (e.g. the autocast precision).

    Example::

        >>> teacher = nn.Linear(2, 2)
        >>> a = teacher_fingerprint({"t": teacher}, {"t": [""]})
        >>> a == teacher_fingerprint({"t": teacher}, {"t": [""]}), a == teacher_fingerprint({"t": teacher})
        (True, False)
        >>> with torch.no_grad():
        ...     _ = teacher.weight.add_(1.0)
        >>> a == teacher_fingerprint({"t": teacher}, {"t": [""]})
        False
    """
    digest = hashlib.sha256()
    layers = {str(k): [str(p) for p in v] for k, v in sorted((feature_layers or {}).items())}
    digest.update(json.dumps({"version": _FORMAT_VERSION, "layers": layers, "extra": extra}, sort_keys=True,
                             default=str).encode())
    for name in sorted(teachers):
        digest.update(f"teacher:{name}".encode())
        for key, value in teachers[name].state_dict().items():
            if not isinstance(value, Tensor):
                digest.update(f"{key}={value!r}".encode())
                continue
            tensor = value.detach()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            if tensor.is_meta or tensor.numel() == 0:
                continue
            flat = tensor.cpu().contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


class IndexedDataset(Dataset):
    """A map-style dataset whose items also carry their index, for :class:`TeacherCache`.

    The index is added where the default collate function keeps it: as the last element of a tuple or list item,
    under ``key`` in a mapping item, and as ``(item, index)`` otherwise. The collated batch then has a tensor of
    sample indices to pass as ``run_teachers(..., sample_index=...)``.

    Args:
        dataset: any map-style dataset (``__getitem__`` and ``__len__``).
        key: the key of the index in mapping items.

    Raises:
        ValueError: a mapping item already has ``key``.

    Example::

        >>> data = IndexedDataset(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.ones(3)))
        >>> x, y, index = data[2]
        >>> index, len(data)
        (2, 3)
        >>> IndexedDataset([{"x": 1}])[0]
        {'x': 1, 'index': 0}
    """

    def __init__(self, dataset: Any, key: str = "index") -> None:
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            if self.key in item:
                raise ValueError(f"Expected items without key `{self.key}` but got one: {sorted(item)}")
            return {**item, self.key: index}
        if isinstance(item, tuple):
            return (*item, index)
        if isinstance(item, list):
            return [*item, index]
        return (item, index)


# ---------------------------------------------------------------------------------------------------------- layout


def _flatten(value: Any, leaves: list[Tensor], where: str) -> Any:
    """A JSON description of ``value`` whose tensors are appended to ``leaves`` (and named by their position)."""
    if isinstance(value, Tensor):
        leaves.append(value)
        return len(leaves) - 1
    if value is None:
        return {"none": True}
    if isinstance(value, (tuple, list)):
        return {"seq": "list" if isinstance(value, list) else "tuple",
                "items": [_flatten(v, leaves, where) for v in value]}
    if isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise StageConfigError(
                StageProblem("cannot be cached: mapping keys must be strings", name="teacher_cache", field=where,
                             value=keys)
            )
        return {"map": keys, "items": [_flatten(value[k], leaves, where) for k in keys]}
    raise StageConfigError(
        StageProblem(f"cannot be cached: {type(value).__name__} is not a tensor, tuple, list, dict or None",
                     name="teacher_cache", field=where, value=type(value).__name__,
                     hint="return tensors or plain containers of tensors from the teacher and the hooked layers")
    )


def _unflatten(spec: Any, leaves: Sequence[Tensor]) -> Any:
    if isinstance(spec, int):
        return leaves[spec]
    if "none" in spec:
        return None
    if "map" in spec:
        return {k: _unflatten(s, leaves) for k, s in zip(spec["map"], spec["items"])}
    items = [_unflatten(s, leaves) for s in spec["items"]]
    return items if spec["seq"] == "list" else tuple(items)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_index(sample_index: Any) -> Tensor:
    index = torch.as_tensor(sample_index)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise StageConfigError(
            StageProblem("must hold integer sample indices", name="teacher_cache", field="sample_index",
                         value=str(index.dtype))
        )
    return index.reshape(-1).to(device="cpu", dtype=torch.long)


class TeacherCache:
    """Stores teacher outputs and hooked teacher features per sample, so later distilling epochs skip the teachers.

    Give it to a :class:`~lightning_stages.DistillationModule` as ``teacher_cache`` (class attribute or in
    ``__init__``) and pass the batch's sample indices to ``run_teachers(..., sample_index=...)``. In training
    steps, a batch whose samples are all stored is read from the cache and the teachers do not run; any other
    batch runs the teachers and is stored. Evaluation steps (module in eval mode) always run the teachers.

    Entries are keyed by a :func:`teacher_fingerprint` of the teachers' weights, the hooked feature layers and the
    teacher precision: when any of these changes, every entry is dropped (and the files deleted).

    Storage is preallocated per output tensor as ``(capacity, *per_sample_shape)`` and grows by doubling; every
    batch must give the same per-sample shapes (fixed-size inputs). Values come back in the dtype the teacher
    produced, on the module's device.

    Args:
        directory: where to keep the entries as memory-mapped files (one cache per directory and process);
            ``None`` keeps them in CPU memory.
        dtype: store floating-point values in this dtype (e.g. ``torch.float16``, half the bytes of float32);
            ``None`` keeps the teacher's dtype.
        num_samples: the dataset size, to allocate once instead of growing.

    Raises:
        ValueError: ``dtype`` is not a floating-point dtype or ``num_samples`` is not a positive integer.

    Example::

        >>> cache = TeacherCache(dtype=torch.float16)
        >>> cache.bind("fingerprint-1")
        False
        >>> cache.lookup([0, 1]) is None  # a miss: run the teacher, then store
        True
        >>> cache.store([0, 1], {"t": torch.tensor([[1.0], [2.0]])}, {"t": {"layer": torch.zeros(2, 3)}})
        >>> outputs, features = cache.lookup([1])
        >>> outputs["t"], features["t"]["layer"].shape, len(cache)
        (tensor([[2.]]), torch.Size([1, 3]), 2)
        >>> cache.bind("fingerprint-2"), len(cache)  # other teacher weights: everything is dropped
        (False, 0)
    """

    def __init__(
        self, directory: Union[str, os.PathLike, None] = None, dtype: Optional[torch.dtype] = None,
        num_samples: Optional[int] = None,
    ) -> None:
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"Expected argument `dtype` to be None or a floating-point torch.dtype but got {dtype!r}")
        if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                        or num_samples < 1):
            raise ValueError(f"Expected argument `num_samples` to be a positive integer but got {num_samples!r}")
        self.directory = os.fspath(directory) if directory is not None else None
        self.dtype = dtype
        self.num_samples = num_samples
        #: lookups that found every sample / lookups that did not, since the last change of fingerprint
        self.hits = 0
        self.misses = 0
        self._reset()

    def _reset(self) -> None:
        self._fingerprint: Optional[str] = None
        self._layout: Optional[dict[str, Any]] = None  # outputs/features specs and per-leaf shapes and dtypes
        self._leaves: list[Tensor] = []
        self._filled: Optional[Tensor] = None
        self._capacity = 0
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ pickling: configuration only

    def __getstate__(self) -> dict[str, Any]:
        # deep copies (StochasticWeightAveraging) and pickles (ddp_spawn) of the module carry the configuration,
        # never the stored values
        return {"directory": self.directory, "dtype": self.dtype, "num_samples": self.num_samples}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        where = f"directory={self.directory!r}" if self.directory is not None else "in memory"
        return f"TeacherCache({where}, dtype={self.dtype}, samples={len(self)})"

    def __len__(self) -> int:
        """How many samples are stored."""
        return 0 if self._filled is None else int(self._filled.sum())

    @property
    def fingerprint(self) -> Optional[str]:
        """The fingerprint the entries belong to (``None`` before :meth:`bind`)."""
        return self._fingerprint

    # ------------------------------------------------------------------ binding

    def bind(self, fingerprint: str) -> bool:
        """Use the entries stored for ``fingerprint``; drop (and delete) the entries of any other one.

        Returns:
            Whether stored entries were kept (in memory, or found in ``directory`` from an earlier run).
        """
        if fingerprint == self._fingerprint:
            return self._layout is not None
        if self.directory is None:
            self.clear()
            self._fingerprint = fingerprint
            return False
        if self._fingerprint is not None:  # this object wrote the files under another fingerprint
            self.clear()
        self._reset()
        self._fingerprint = fingerprint
        return self._load_directory(fingerprint)  # keeps the files of this fingerprint, deletes any others

    def clear(self) -> None:
        """Drop every entry (and delete the files this cache wrote in ``directory``)."""
        if self.directory is not None:
            self._delete_files()
        self._reset()

    # ------------------------------------------------------------------ read and write

    def lookup(self, sample_index: Any, device: Union[torch.device, str, None] = None) -> Optional[tuple[dict, dict]]:
        """The stored outputs and features of the samples ``sample_index``, or ``None`` unless all are stored.

        Returns:
            ``({teacher: output}, {teacher: {layer path: feature}})``, batched in the order of ``sample_index``,
            in the dtype the teacher produced, on ``device`` (default: CPU).
        """
        index = _as_index(sample_index)
        if self._layout is None or index.numel() == 0 or int(index.max()) >= self._capacity \
                or not bool(self._filled[index].all()):  # type: ignore[index]
            self.misses += 1
            return None
        self.hits += 1
        leaves = []
        for stored, (_, dtype_name) in zip(self._leaves, self._layout["leaves"]):
            values = stored.index_select(0, index)
            leaves.append(values.to(device=device, dtype=getattr(torch, dtype_name)))
        outputs = {name: _unflatten(spec, leaves) for name, spec in self._layout["outputs"].items()}
        features = {
            name: {path: _unflatten(spec, leaves) for path, spec in paths.items()}
            for name, paths in self._layout["features"].items()
        }
        return outputs, features

    def store(self, sample_index: Any, outputs: Mapping[str, Any], features: Mapping[str, Mapping[str, Any]]) -> None:
        """Store the teachers' ``outputs`` and hooked ``features`` of a batch, row ``i`` for ``sample_index[i]``.

        Raises:
            StageConfigError: the batch's tensors do not have one row per sample index, or their per-sample shapes
                or structure differ from the stored ones.
        """
        index = _as_index(sample_index)
        if index.numel() and int(index.min()) < 0:
            raise StageConfigError(StageProblem("must be >= 0", name="teacher_cache", field="sample_index",
                                                value=int(index.min())))
        leaves: list[Tensor] = []
        out_specs = {name: _flatten(value, leaves, f"output of teacher {name!r}") for name, value in outputs.items()}
        feat_specs = {
            name: {path: _flatten(value, leaves, f"feature {name}.{path}") for path, value in paths.items()}
            for name, paths in features.items()
        }
        for position, leaf in enumerate(leaves):
            if leaf.dim() == 0 or leaf.shape[0] != index.numel():
                raise StageConfigError(
                    StageProblem(
                        f"has shape {tuple(leaf.shape)} but the batch has {index.numel()} sample indices; the cache "
                        "needs one row per sample", name="teacher_cache", field=f"tensor {position}",
                        value=tuple(leaf.shape),
                    )
                )
        layout = {
            "outputs": out_specs, "features": feat_specs,
            "leaves": [[list(leaf.shape[1:]), _dtype_name(leaf.dtype)] for leaf in leaves],
        }
        if self._layout is None:
            self._create(layout, max(int(index.max()) + 1 if index.numel() else 1, self.num_samples or 1))
        elif layout != self._layout:
            raise StageConfigError(
                StageProblem(
                    "changed between batches (structure, per-sample shape or dtype); the cache needs the same "
                    "per-sample shapes for every batch", name="teacher_cache", field="teacher outputs",
                    value=layout["leaves"], hint=f"stored: {self._layout['leaves']}",
                )
            )
        if index.numel() == 0:
            return
        self._grow(int(index.max()) + 1)
        for stored, leaf in zip(self._leaves, leaves):
            stored.index_copy_(0, index, leaf.detach().to(device="cpu", dtype=stored.dtype))
        self._filled[index] = True  # type: ignore[index]

    # ------------------------------------------------------------------ storage

    def _stored_dtype(self, dtype_name: str) -> torch.dtype:
        dtype = getattr(torch, dtype_name)
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    def _create(self, layout: dict[str, Any], capacity: int) -> None:
        if self.directory is not None:
            self._delete_files()
            os.makedirs(self.directory, exist_ok=True)
            for name in [*(f"leaf{k}.bin" for k in range(len(layout["leaves"]))), _FILLED_FILE]:
                with open(self._path(name), "wb"):  # start from empty files: no stale "filled" flags
                    pass
        self._layout = layout
        self._capacity = 0
        self._leaves = [torch.empty((0, *shape), dtype=self._stored_dtype(d)) for shape, d in layout["leaves"]]
        self._filled = torch.zeros(0, dtype=torch.bool)
        self._grow(capacity, exact=True)

    def _grow(self, needed: int, exact: bool = False) -> None:
        if needed <= self._capacity:
            return
        capacity = needed if exact else max(needed, 2 * self._capacity)
        if self.directory is None:
            grown = []
            for old in self._leaves:
                new = torch.empty((capacity, *old.shape[1:]), dtype=old.dtype)
                new[: self._capacity] = old
                grown.append(new)
            self._leaves = grown
            filled = torch.zeros(capacity, dtype=torch.bool)
            filled[: self._capacity] = self._filled  # type: ignore[index]
            self._filled = filled
        else:
            self._capacity = capacity  # the files grow in place; mapping them again keeps their contents
            self._write_meta()
            self._leaves = [self._map(f"leaf{k}.bin", capacity, old.shape[1:], old.dtype)
                            for k, old in enumerate(self._leaves)]
            self._filled = self._map(_FILLED_FILE, capacity, (), torch.bool)
        self._capacity = capacity

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)  # type: ignore[arg-type]

    def _map(self, name: str, capacity: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        row = 1
        for size in shape:
            row *= int(size)
        numel = capacity * row
        path = self._path(name)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        with open(path, "ab"):
            pass
        if os.path.getsize(path) < nbytes:
            os.truncate(path, nbytes)  # new bytes read as zeros: "not filled"
        if numel == 0:
            return torch.zeros((capacity, *shape), dtype=dtype)
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(capacity, *shape)

    def _write_meta(self) -> None:
        os.makedirs(self.directory, exist_ok=True)  # type: ignore[arg-type]
        meta = {"version": _FORMAT_VERSION, "fingerprint": self._fingerprint, "capacity": self._capacity,
                "stored_dtype": None if self.dtype is None else _dtype_name(self.dtype), "layout": self._layout}
        tmp = self._path(_META_FILE + ".tmp")
        with open(tmp, "w") as handle:
            json.dump(meta, handle)
        os.replace(tmp, self._path(_META_FILE))

    def _read_meta(self) -> Optional[dict[str, Any]]:
        try:
            with open(self._path(_META_FILE)) as handle:
                meta = json.load(handle)
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _load_directory(self, fingerprint: str) -> bool:
        meta = self._read_meta()
        stored_dtype = None if self.dtype is None else _dtype_name(self.dtype)
        if (meta is None or meta.get("version") != _FORMAT_VERSION or meta.get("fingerprint") != fingerprint
                or meta.get("stored_dtype") != stored_dtype or not meta.get("layout")):
            self._delete_files(meta)
            return False
        self._layout = meta["layout"]
        self._capacity = int(meta["capacity"])
        self._leaves = [self._map(f"leaf{k}.bin", self._capacity, shape, self._stored_dtype(d))
                        for k, (shape, d) in enumerate(self._layout["leaves"])]  # type: ignore[index]
        self._filled = self._map(_FILLED_FILE, self._capacity, (), torch.bool)
        return True

    def _delete_files(self, meta: Optional[dict[str, Any]] = None) -> None:
        """Delete what this cache wrote: the files named by its metadata, never anything else."""
        if meta is None:
            meta = self._read_meta()
        self._leaves, self._filled = [], None
        if meta is None:
            return
        count = len((meta.get("layout") or {}).get("leaves", []))
        for name in [*(f"leaf{k}.bin" for k in range(count)), _FILLED_FILE, _META_FILE]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(name))
