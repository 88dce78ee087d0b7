"""``teacher_fingerprint``: a hash of what the teachers' outputs depend on, the key of a teacher cache."""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from lightning_stages.distillation.feature_selectors import split_hook_path
from lightning_stages.errors import DistillationStepError, StageProblem

__all__ = ["teacher_fingerprint"]

_FORMAT_VERSION = 3  # 3: the modules' plain settings count


@functools.lru_cache(maxsize=256)
def _class_code(cls: type) -> str:
    """A class's module, name and (outside torch) source; the name alone when the source cannot be read."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__.split(".")[0] == "torch":
        return name
    try:
        return f"{name}\n{inspect.getsource(cls)}"
    except (OSError, TypeError):
        return name


def teacher_fingerprint(
    teachers: Mapping[str, nn.Module], feature_layers: Optional[Mapping[str, Sequence[str]]] = None,
    extra: Any = None, version: Optional[str] = None,
) -> str:
    """A hash of what the teachers' outputs depend on: weights and buffers, code, hooked layers and ``extra``.

    Two fingerprints are equal only if every teacher has the same name, the same ``state_dict`` and non-persistent
    buffers (``register_buffer(..., persistent=False)``; names, dtypes, shapes and bytes), the same classes of modules
    and the same hooked layers. The code of a class is its source
    (``inspect.getsource``; torch's own classes by name), so editing a teacher's ``forward`` changes the fingerprint.
    ``version`` replaces the sources: give one when they cannot be read or change without changing the outputs. It
    reads every weight once (about 20 ms per 40 MB here).

    Args:
        teachers: ``{name: module}``.
        feature_layers: ``{teacher name: [hooked submodule paths]}``.
        extra: any JSON-serialisable value that also changes the outputs (e.g. the autocast precision).
        version: a version of the teachers' code, used instead of their source.

    Example::

        >>> teacher = nn.Linear(2, 2)
        >>> a = teacher_fingerprint({"t": teacher}, {"t": [""]})
        >>> a == teacher_fingerprint({"t": teacher}, {"t": [""]}), a == teacher_fingerprint({"t": teacher})
        (True, False)
        >>> a == teacher_fingerprint({"t": teacher}, {"t": [""]}, version="v2")
        False
        >>> with torch.no_grad():
        ...     _ = teacher.weight.add_(1.0)
        >>> a == teacher_fingerprint({"t": teacher}, {"t": [""]})
        False
    """
    digest = hashlib.sha256()
    layers = {str(k): [str(p) for p in v] for k, v in sorted((feature_layers or {}).items())}
    digest.update(json.dumps({"version": _FORMAT_VERSION, "layers": layers, "extra": extra, "code": version},
                             sort_keys=True, default=str).encode())
    for name in sorted(teachers):
        digest.update(f"teacher:{name}".encode())
        classes = dict.fromkeys(type(module) for module in teachers[name].modules())
        for cls in classes:
            digest.update((f"{cls.__module__}.{cls.__qualname__}" if version is not None else _class_code(cls)).encode())  # type: ignore[arg-type]
        for path, module in teachers[name].named_modules():
            settings = _settings(module)
            if settings:
                digest.update(json.dumps([f"settings:{path}", settings], sort_keys=True).encode())
            hooks = _hooks(module)  # counted only where there are some: a teacher without keeps its fingerprint
            if hooks:
                digest.update(json.dumps([f"hooks:{path}", hooks], sort_keys=True).encode())
        training = [path for path, module in teachers[name].named_modules() if module.training]
        if training:  # eval mode (the usual) keeps the fingerprint; a module in training mode may compute otherwise
            digest.update(json.dumps(["training", training]).encode())
        state = teachers[name].state_dict()
        for key, value in state.items():
            _update(digest, key, value)
        # buffers registered with persistent=False (normalisation constants, rotary inv_freq) change the outputs too;
        # hashed after the state_dict under their own prefix, so a teacher without them keeps its fingerprint
        for key, buffer in sorted(teachers[name].named_buffers(), key=lambda item: item[0]):
            if key not in state:
                _update(digest, f"buffer:{key}", buffer)
    return digest.hexdigest()[:32]


def _settings(module: nn.Module) -> dict[str, Any]:
    """A module's own settings that are not weights: its public attributes (``eps``, ``stride``, ``p``, a
    ``temperature``, a HuggingFace ``config``), each as plain JSON data (:func:`_plain`); its mode aside."""
    return {key: _plain(value) for key, value in sorted(vars(module).items())
            if not key.startswith("_") and key != "training"}


def _hooks(module: nn.Module) -> list[Any]:
    """The forward pre-hooks and forward hooks of ``module`` (they change its output), by their code; the package's
    own feature hooks aside (the hooked layers count on their own)."""
    found = []
    for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks)):
        for hook in hooks.values():
            owner = getattr(hook, "__func__", hook)  # a bound method: its function (compare's cost meter)
            if not any(str(getattr(x, "__module__", "")).startswith("lightning_stages.") for x in (type(hook), owner)):
                found.append([kind, _plain(hook)])
    return found


def _code(code: types.CodeType, depth: int) -> list[Any]:
    """A function's code as plain data: its bytecode, constants (nested functions' code too) and names."""
    constants = [_code(c, depth + 1) if isinstance(c, types.CodeType) else _plain(c, depth + 1) for c in code.co_consts]
    return [code.co_code.hex(), constants, list(code.co_names), code.co_argcount, code.co_kwonlyargcount]


_CONSTANT = (type(None), bool, int, float, complex, str, bytes, enum.Enum, torch.dtype, torch.device, type,
             types.BuiltinFunctionType, Tensor, np.ndarray, np.generic)


def _captured(value: Any, depth: int) -> Any:
    """A value a function closes over or defaults to. Constants (numbers, strings, tensors, tuples of them) count as
    plain data, a function by its name and code; a mutable container or object by its type alone: a hook's state
    (the dict it puts the last activations into) changes as the teacher runs, and must not change the key."""
    if depth > 20:
        return "..."
    if type(value) is tuple:
        return ["tuple", [_captured(item, depth + 1) for item in value]]
    if isinstance(value, types.FunctionType):  # not its own closure: helpers that call each other stay bounded
        return [f"{value.__module__}.{value.__qualname__}", _code(value.__code__, depth + 1)]
    if isinstance(value, _CONSTANT):
        return _plain(value, depth + 1)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _function(value: types.FunctionType, depth: int) -> list[Any]:
    """A Python function by its name, its code, its defaults and the constants it closes over: two lambdas, or a
    function edited between fits, are told apart."""
    cells = []
    for cell in value.__closure__ or ():
        try:
            cells.append(_captured(cell.cell_contents, depth + 1))
        except ValueError:  # a cell not yet filled
            cells.append(None)
    keywords = sorted([name, _captured(item, depth + 1)] for name, item in (value.__kwdefaults__ or {}).items())
    return [f"{value.__module__}.{value.__qualname__}", _code(value.__code__, depth), cells,
            _captured(value.__defaults__, depth + 1), keywords]


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON data that is the same in every process: numbers, strings and containers as they are, a
    tensor by a hash of its bytes, a function or class by its name, an object with ``to_dict()`` (a HuggingFace
    config) by that, any other object by its type alone (its ``repr`` may hold an address)."""
    if depth > 20:
        return "..."
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # nan and inf too
    if isinstance(value, torch.device):  # its type only: DDP ranks on cuda:0 and cuda:1 share one key
        return value.type
    if isinstance(value, enum.Enum):  # by its name: its value may be an object whose repr holds an address
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (complex, torch.dtype, torch.Size)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_plain(item, depth + 1) for item in value]]
    if isinstance(value, Mapping):  # keys as plain as the values (a function or a device may be a key)
        return sorted(([json.dumps(_plain(key, depth + 1), sort_keys=True), _plain(item, depth + 1)]
                       for key, item in value.items()), key=lambda pair: json.dumps(pair, sort_keys=True))
    if isinstance(value, np.generic):  # a numpy number: the Python value it holds
        return [type(value).__name__, _plain(value.item(), depth + 1)]
    if isinstance(value, np.ndarray) and value.dtype != object:  # an object array's bytes are addresses
        return ["ndarray", str(value.dtype), list(value.shape),
                hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()]
    if isinstance(value, Tensor):
        digest = hashlib.sha256()
        try:
            if value.layout != torch.strided and not value.is_nested:  # sparse (an adjacency): indices and values
                coo = (value if value.layout == torch.sparse_coo else value.to_sparse()).coalesce()
                _update(digest, f"sparse{tuple(value.shape)}", coo.indices())
                value = coo.values()
            _update(digest, "", value)
        except (RuntimeError, TypeError, NotImplementedError):  # nested, quantized: by dtype, shape and layout
            return ["tensor", str(value.dtype), str(value.layout), value.is_nested or list(value.shape)]
        return digest.hexdigest()
    if isinstance(value, types.FunctionType):
        return _function(value, depth + 1)
    if isinstance(value, types.MethodType):  # a bound method: its function and the type it is bound to
        return ["method", _plain(value.__func__, depth + 1), f"<{type(value.__self__).__qualname__}>"]
    if isinstance(value, (types.BuiltinFunctionType, type, functools.partial)):
        if isinstance(value, functools.partial):
            return ["partial", _plain(value.func, depth + 1), _plain(value.args, depth + 1),
                    _plain(value.keywords, depth + 1)]
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, nn.Module):
        try:
            return [type(value).__qualname__, _plain(to_dict(), depth + 1)]
        except Exception:  # a to_dict that fails: the type alone
            pass
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _update(digest: Any, key: str, value: Any) -> None:
    """Add ``key`` and ``value`` to ``digest``: a tensor's dtype, shape and bytes, anything else by its ``repr``."""
    if not isinstance(value, Tensor):
        digest.update(f"{key}={value!r}".encode())
        return
    tensor = value.detach()
    digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    if tensor.is_meta or tensor.numel() == 0:
        return
    flat = tensor.cpu().contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy())


_registered = [0, False]  # weights, buffers and submodules set on any module since the hooks below were installed


def registrations() -> int:
    """How many parameters, buffers and submodules have been set on modules in this process since the first call: a
    weight replaced rather than written (``load_state_dict(assign=True)``, ``teacher.head = new_head``) moves it,
    while an in-place write moves the tensors' version counters only. One integer to compare at each cached step."""
    if not _registered[1]:
        def count(*_: Any) -> None:
            _registered[0] += 1

        torch_module.register_module_parameter_registration_hook(count)
        torch_module.register_module_buffer_registration_hook(count)
        torch_module.register_module_module_registration_hook(count)
        _registered[1] = True
    return int(_registered[0])


def refuse_random_teachers(teachers: Mapping[str, nn.Module], stage: Optional[str]) -> None:
    """Refuse a teacher with dropout or batch normalization in training mode, whose outputs are random or depend on
    the batch: a stored row would serve one draw for every later epoch.

    Raises:
        DistillationStepError: naming the teacher and the layer (the caller names the stage).
    """
    for name, teacher in teachers.items():
        for path, module in teacher.named_modules():
            if module.training and isinstance(module, (_DropoutNd, _BatchNorm)):
                where = f"{name}.{path}" if path else name
                raise DistillationStepError(StageProblem(
                    f"is in training mode, so teacher {name!r} computes a random or batch-dependent output, and a "
                    "stored row would stand for one draw in every later epoch", name=None,
                    field=f"teachers.{where}", value=type(module).__name__,
                    hint="teachers are put in eval mode when prepared: keep them there (something called .train() "
                    "on it), or set teacher_cache = None to run the teacher at every step"), stage=stage,
                    when="a training step")


def sequence_first_layers(teachers: Mapping[str, nn.Module], layers: Mapping[str, Sequence[str]]) -> list[str]:
    """The hooked teacher layers whose selected output has its samples in the second dimension: an
    ``nn.MultiheadAttention`` or transformer layer without ``batch_first=True`` (its output, not its attention weights),
    an ``nn.RNN``/``LSTM``/``GRU`` without it, and any recurrent layer's ``h_n``/``c_n`` (``lstm[1]``)."""
    found = []
    for name, paths in layers.items():
        for path in paths:
            try:
                module_path, steps = split_hook_path(path)
                module = teachers[name].get_submodule(module_path)
            except (ValueError, AttributeError, KeyError):
                continue
            attention = getattr(module, "self_attn", None)
            batch_first = getattr(module, "batch_first", getattr(attention, "batch_first", True))
            if isinstance(module, nn.RNNBase):
                late = (steps[:1] == (1,)) or (not batch_first and steps[:1] in ((), (0,)))
            elif isinstance(module, nn.MultiheadAttention) or isinstance(attention, nn.MultiheadAttention):
                late = not batch_first and steps[:1] in ((), (0,))
            else:
                late = False
            if late:
                found.append(f"{name}.{path} ({type(module).__name__})")
    return found


def warn_sequence_first(teachers: Mapping[str, nn.Module], layers: Mapping[str, Sequence[str]], stored: bool) -> None:
    """Warn of each hooked layer of :func:`sequence_first_layers` when the cache stores features (``stored``): its
    first dimension is stored as the samples'. Refused with a clear error when its length differs from the batch
    size, it would be served to other batches when they are equal."""
    for layer in sequence_first_layers(teachers, layers) if stored else ():
        warnings.warn(f"TeacherCache: the hooked layer {layer} outputs its samples in the second dimension, and the "
                      "cache stores the first as the samples': make it batch-first (batch_first=True, or select its "
                      "batch-first output), or use TeacherCache(store_features=False)", UserWarning, stacklevel=2)
