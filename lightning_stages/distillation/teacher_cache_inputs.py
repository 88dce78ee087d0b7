"""The checksum of a batch's teacher inputs, one per sample: a row stored by a :class:`~lightning_stages.TeacherCache`
is only served for the input it was computed from.

* :func:`input_fingerprints`: each sample's checksum over every tensor of the inputs (and their plain values);
* :func:`input_tensors`: the tensors of the inputs;
* :func:`input_checksums`: the checksums of a cache's reads and writes, an input that cannot be read refused;
* :func:`sample_indices`: a batch's sample indices, checked;
* :func:`input_versions`: the version counters of the inputs' tensors (an in-place change moves them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_stages.distillation.teacher_cache_bytes import byte_hash, plain_strides, row_words
from lightning_stages.errors import DistillationStepError, StageProblem

__all__ = ["UncheckableInput", "input_checksums", "input_fingerprints", "input_tensors", "input_versions",
           "sample_indices"]

_MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=4096)  # the same few names and values at every step
def _bytes_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _tensor_rows_hash(tensor: Tensor, rows: int, constant: Optional[Tensor] = None, first: int = 0) -> Tensor:
    """:func:`~lightning_stages.distillation.teacher_cache_bytes.byte_hash` of each of the ``rows`` rows of ``tensor``'s bytes (unsalted; see :func:`_salt`), plus ``constant``, its words at the positions after ``first``.

    A contiguous 2-d tensor (the usual batch) is read in place, with no copy."""
    flat = tensor.detach() if tensor.requires_grad else tensor
    if flat.dim() != 2 or not flat.is_contiguous():
        flat = flat.reshape(rows, -1).contiguous()
    flat = plain_strides(flat)  # before view(torch.int8), which refuses a last stride other than 1
    if not flat.shape[1]:  # rows of no elements: nothing to read (their shape enters through the salt)
        zeros = torch.zeros(rows, dtype=torch.int64, device=flat.device)
        return zeros if constant is None else zeros + constant
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return byte_hash(flat.view(torch.int8), constant, first)


def _words(tensor: Tensor) -> int:
    """How many 32-bit words the checksum reads from each row (the first dimension) of ``tensor``."""
    return row_words(math.prod(tensor.shape[1:]) * tensor.element_size())


def _salt(tensor: Tensor) -> int:
    """What a tensor's dtype and row shape add to each row's checksum."""
    return _bytes_hash(f"{tensor.dtype}{tuple(tensor.shape[1:])}")


def input_tensors(inputs: Any) -> list[Tensor]:
    """Every tensor in ``inputs`` (nested tuples, lists and mappings).

    Example::

        >>> len(input_tensors(((torch.ones(1),), {"mask": [torch.ones(2)], "flag": True})))
        2
    """
    tensors: list[Tensor] = []
    pending = [inputs]
    while pending:
        value = pending.pop()
        if isinstance(value, Tensor):
            tensors.append(value)
        elif isinstance(value, Mapping):
            pending.extend(value.values())
        elif isinstance(value, (tuple, list)):
            pending.extend(value)
    return tensors


class UncheckableInput(TypeError):
    """An input the checksum cannot cover: an object that is not a tensor, array, plain value or container, or a
    tensor or array whose content cannot be read as bytes (``reason`` says why)."""

    def __init__(self, kind: str, reason: Optional[str] = None) -> None:
        super().__init__(f"a {kind} cannot be read ({reason})" if reason else
                         f"a {kind} is not a tensor, array, number, string, dataclass, or list, tuple or dict of them")
        self.kind = kind


@contextlib.contextmanager
def _reading(value: Any) -> Iterator[None]:
    """An error while reading ``value``'s bytes becomes :class:`UncheckableInput` naming it (one already raised for a
    value inside it, and CUDA's out-of-memory error, pass through)."""
    try:
        yield
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
        if isinstance(err, (UncheckableInput, torch.cuda.OutOfMemoryError)):
            raise
        raise _unreadable(value, err) from err


def _unreadable(value: Any, err: Exception) -> UncheckableInput:
    """The error for a tensor or array whose bytes cannot be read (a jagged nested tensor, a quantized or MKL-DNN
    tensor, a numpy array of strings, dates or records)."""
    kind = type(value).__qualname__
    if isinstance(value, (Tensor, np.ndarray)):
        kind += f" of {value.dtype}"
    if isinstance(value, Tensor):
        kind += f" ({'nested, ' * value.is_nested}{value.layout})"
    return UncheckableInput(kind, str(err).splitlines()[0] if str(err) else type(err).__name__)


_ROW_MARK = _bytes_hash("a tensor of one row per sample")
_PLAIN = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, enum.Enum, np.generic)


def input_fingerprints(inputs: Any, rows: int) -> Tensor:
    """One 64-bit checksum per sample of the teachers' ``inputs`` (a CPU ``int64`` tensor of ``rows`` values).

    Tensors (and numpy arrays) with ``rows`` rows are hashed row by row; any other tensor (sparse ones by their
    indices and values), and plain values (numbers, strings, None, dtypes, numpy scalars), enter every row's checksum
    in full; dataclasses by their fields, containers by their items.

    Raises:
        UncheckableInput: any other object (its content cannot be checked, so a row stored for it could be stale).

    Example::

        >>> x = torch.arange(6.0).reshape(3, 2)
        >>> a = input_fingerprints(((x,), {}), 3)
        >>> bool(a[0] == input_fingerprints(((x[:1],), {}), 1)[0]), bool(a[0] == a[1])
        (True, False)
    """
    if rows == 0:
        return torch.zeros(0, dtype=torch.int64)
    alone = _lone_batch_tensor(inputs, rows)
    if alone is not None:  # the usual call, run_teachers(x): what the walk below gives, without the walk
        with _reading(alone):
            constant = _lone_constant(alone.dtype, tuple(alone.shape[1:]), alone.device)
            return _tensor_rows_hash(alone, rows, constant).cpu()
    return _walk(inputs, rows, hash_rows=True)


def _lone_batch_tensor(inputs: Any, rows: int) -> Optional[Tensor]:
    """``x`` when ``inputs`` is ``((x,), {})`` and ``x`` a plain strided tensor of ``rows`` rows, else ``None``."""
    if type(inputs) is not tuple or len(inputs) != 2:
        return None
    args, kwargs = inputs
    if type(args) is not tuple or len(args) != 1 or type(kwargs) is not dict or kwargs:
        return None
    x = args[0]
    if (type(x) is not Tensor or x.is_meta or x.layout != torch.strided or x.is_nested or x.is_quantized
            or x.is_conj() or x.is_neg() or not x.dim() or x.shape[0] != rows):
        return None
    return x


@functools.lru_cache(maxsize=256)
def _lone_constant(dtype: torch.dtype, row_shape: tuple[int, ...], device: torch.device) -> Tensor:
    """What :func:`_walk` adds to each row's hash of a lone batch tensor ``((x,), {})`` of this dtype and row shape
    (found by walking such inputs with the rows' hashes left out: the same walk, so the same value), as a 0-d tensor
    on ``device``, so that the hash adds it in its last operation."""
    stand_in = torch.empty((), dtype=dtype).expand(1, *row_shape)  # no memory of its own; its data is never read
    return torch.tensor(int(_walk(((stand_in,), {}), 1, hash_rows=False)[0]), dtype=torch.int64, device=device)


def _walk(inputs: Any, rows: int, hash_rows: bool) -> Tensor:
    """:func:`input_fingerprints` of any inputs, by walking them; with ``hash_rows=False`` only the constant part
    (every row tensor's own hash counted as 0)."""
    # each row's checksum is the sum of every tensor's words (its row of each row tensor, the whole of each other
    # tensor) times the multipliers of their positions, the tensors' words taking consecutive positions in the order
    # walked (so two flipped signs anywhere in them are always seen), plus the structure (salts, shared values),
    # modulo 2**64; the Python-int parts are summed here and added once, so that one batch tensor costs only its hash
    total: Optional[Tensor] = None
    offset = shared = summed = words = 0  # words: how many positions the tensors walked so far took

    def mix(value: int) -> None:  # a value that enters every row's checksum
        nonlocal shared
        shared = (shared * 31 + value) & _MASK64

    def add_shared(tensor: Tensor) -> None:  # the whole tensor, and its shape, enter every row's checksum
        nonlocal summed, words
        flat = tensor.reshape(1, -1)
        summed += int(_tensor_rows_hash(flat, 1, first=words))
        words += _words(flat)
        mix(_bytes_hash(f"{tensor.dtype}{tuple(tensor.shape)}"))

    def visit(value: Any) -> None:
        with _reading(value):
            visit_value(value)

    def visit_value(value: Any) -> None:
        nonlocal total, offset, words
        if isinstance(value, np.ndarray) and value.dtype != object:  # as a tensor, in this machine's byte order
            value = torch.from_numpy(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("=")))
        if isinstance(value, Tensor):
            if value.is_quantized:  # its bytes are not its values (and viewing them can crash the process)
                raise _unreadable(value, TypeError("a quantized tensor"))
            if value.is_conj() or value.is_neg():  # lazy views: their values, not their memory
                value = value.resolve_conj().resolve_neg()
            if value.is_meta:  # no data to read
                mix(_bytes_hash(f"{value.dtype}{tuple(value.shape)}"))
            elif value.layout != torch.strided:  # sparse: its indices and values, whole
                coo = (value if value.layout == torch.sparse_coo else value.to_sparse()).coalesce()
                mix(_bytes_hash(f"{value.layout}{value.dtype}{tuple(value.shape)}"))
                add_shared(coo.indices())
                add_shared(coo.values())
            elif value.dim() and value.shape[0] == rows:
                hashed = (_tensor_rows_hash(value, rows, first=words).cpu() if hash_rows
                          else torch.zeros(rows, dtype=torch.int64))
                words += _words(value)
                total = hashed if total is None else total + hashed
                offset = (offset * 31 + _salt(value)) & _MASK64
                mix(_ROW_MARK)  # where it stands among the shared values: (x, m, None) is not (x, None, m)
            else:
                add_shared(value)
        elif isinstance(value, Mapping):
            mix(_bytes_hash(f"{type(value).__qualname__}{len(value)}"))  # {"a": {}, "b": 1} is not {"a": {"b": 1}}
            for key in value:
                mix(_bytes_hash(repr(key)))
                visit(value[key])
        elif isinstance(value, (tuple, list)):
            mix(_bytes_hash(f"{type(value).__qualname__}{len(value)}"))
            for item in value:
                visit(item)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            mix(_bytes_hash(type(value).__qualname__))
            for field in dataclasses.fields(value):
                mix(_bytes_hash(field.name))
                visit(getattr(value, field.name))
        elif isinstance(value, _PLAIN):
            mix(_bytes_hash(f"{type(value).__qualname__}:{value!r}"))
        else:
            raise UncheckableInput(type(value).__qualname__)

    visit(inputs)
    constant = (offset + shared + summed) & _MASK64
    constant -= (1 << 64) if constant >= 1 << 63 else 0  # as a signed 64-bit integer
    if total is None:
        return torch.full((rows,), constant, dtype=torch.int64)
    return total + constant if constant else total


def _refused(message: str, field: str, value: Any, hint: Optional[str] = None) -> DistillationStepError:
    return DistillationStepError(StageProblem(message, name="teacher_cache", field=field, value=value, hint=hint),
                                 when="a step")  # the mixin may re-raise it naming the stage


def sample_indices(sample_index: Any, num_samples: Optional[int]) -> list[int]:
    """A batch's sample indices as a list of ints, checked: integers, ``>= 0`` and below ``num_samples``.

    Raises:
        DistillationStepError: naming ``sample_index`` and the value.

    Example::

        >>> sample_indices(torch.tensor([3, 1]), num_samples=4)
        [3, 1]
    """
    if isinstance(sample_index, Tensor) and sample_index.dim() == 1 and sample_index.dtype == torch.int64:
        values = sample_index.tolist()  # the usual batch of indices, read as it is
    else:
        try:
            index = torch.as_tensor(sample_index)
        except (TypeError, ValueError, RuntimeError) as err:
            raise _refused(f"must hold integer sample indices ({err})", "sample_index",
                           type(sample_index).__name__) from err
        if index.numel() and (index.is_floating_point() or index.is_complex() or index.dtype == torch.bool):
            raise _refused("must hold integer sample indices", "sample_index", str(index.dtype))
        values = index.reshape(-1).tolist()
    if values and min(values) < 0:
        raise _refused("must be >= 0 (indices into the dataset)", "sample_index", min(values))
    if values and max(values) >= 1 << 63:  # e.g. a uint64 index: not a 64-bit dataset index
        raise _refused("must be < 2**63 (indices into the dataset)", "sample_index", max(values))
    if values and num_samples is not None and max(values) >= num_samples:
        raise _refused(f"must be < num_samples = {num_samples}", "sample_index", max(values),
                       "num_samples is the dataset size; raise it or pass dataset indices")
    return values


def input_versions(inputs: Any) -> Optional[tuple[int, ...]]:
    """The version counters of the tensors in ``inputs`` (``None`` if one has none: an inference-mode tensor)."""
    try:
        return tuple(tensor._version for tensor in input_tensors(inputs))
    except RuntimeError:
        return None


def input_checksums(inputs: Any, rows: int) -> Tensor:
    """:func:`input_fingerprints` of a cache's read or write (zeros for ``None``: no check), computed afresh for each:
    a store labels its rows with its inputs as they are then (a change since the lookup, also through numpy or
    ``.data``, which moves no version counter, is in them).

    Raises:
        DistillationStepError: an input the checksum cannot cover, naming ``inputs`` and its type.
    """
    if inputs is None:
        return torch.zeros(rows, dtype=torch.int64)
    try:
        return input_fingerprints(inputs, rows)
    except UncheckableInput as err:
        raise _refused(f"cannot be checked by the cache: {err}, so a stored row could be stale", "inputs", err.kind,
                       "pass the teachers tensors, arrays, numbers, strings, dataclasses, or lists, tuples and dicts "
                       "of them") from err
