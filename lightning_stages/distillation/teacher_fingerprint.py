"""``teacher_fingerprint``: a hash of what the teachers' outputs depend on, the key of a teacher cache."""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import types
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

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
    and the same hooked layers. The code of a class (and of each of its base classes) is its source
    (``inspect.getsource``; torch's own classes by name), so editing a teacher's ``forward``, also an inherited one,
    changes the fingerprint; functions defined outside the classes are not read (give ``version``).
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
        # every module's class and its base classes outside torch (an inherited forward is the teacher's code too; a
        # teacher of torch's classes, or of classes that derive from torch's alone, keeps its fingerprint)
        classes = dict.fromkeys(cls for module in teachers[name].modules() for cls in type(module).__mro__[:-1]
                                if cls is type(module) or cls.__module__.split(".")[0] != "torch")
        for cls in classes:
            digest.update((f"{cls.__module__}.{cls.__qualname__}" if version is not None else _class_code(cls)).encode())
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
    """The forward pre-hooks and forward hooks of ``module`` (they change its output), by their code (:func:`_captured`;
    an object by its class's source and the constants among its attributes); the package's own hooks aside (its
    feature hooks: the hooked layers count on their own; ``compare``'s cost meter)."""
    found = []
    for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks)):
        for hook in hooks.values():
            if _ours(hook):
                continue
            if isinstance(hook, (types.FunctionType, types.MethodType, functools.partial)):
                found.append([kind, _captured(hook, 0, set())])
            else:
                code = _class_code(type(hook))  # type: ignore[arg-type]
                found.append([kind, code, _captured(_attributes(hook), 0, set())])
    return found


def _ours(hook: Any) -> bool:
    try:
        owner = getattr(hook, "__func__", hook)  # a bound method: its function
        return any(str(getattr(x, "__module__", "")).startswith("lightning_stages.") for x in (type(hook), owner))
    except Exception:  # an object whose attribute lookup fails its own way: not ours
        return False


def _attributes(value: Any) -> tuple:
    try:
        return tuple(sorted((str(key), item) for key, item in vars(value).items()))
    except TypeError:  # no __dict__ (slots)
        return ()


def _code(code: types.CodeType, depth: int) -> list[Any]:
    """A function's code as plain data: its bytecode, constants (nested functions' code too) and names."""
    constants = [_code(c, depth + 1) if isinstance(c, types.CodeType) else _plain(c, depth + 1) for c in code.co_consts]
    return [code.co_code.hex(), constants, list(code.co_names), code.co_argcount, code.co_kwonlyargcount]


_CONSTANT = (type(None), bool, int, float, complex, str, bytes, frozenset, enum.Enum, torch.dtype, torch.device,
             type, types.BuiltinFunctionType, np.ndarray, np.generic)


def _captured(value: Any, depth: int, seen: set[int]) -> Any:
    """A value a function closes over or defaults to, or a hook. Constants (numbers, strings, bytes, tensors never
    written in place, tuples and frozensets of them) count as plain data; a function by its name, code and what it
    closes over in turn (``seen``: each function once); a method by its function; a partial by its function and
    arguments. A mutable container or object, or a tensor written in place, counts by its type (and a tensor's
    dtype and shape): a hook's state (the dict or buffer it keeps the last activations in) changes as the teacher
    runs, and must not change the key."""
    if depth > 20:
        return "..."
    if type(value) is tuple:
        return ["tuple", [_captured(item, depth + 1, seen) for item in value]]
    if isinstance(value, types.FunctionType):
        if id(value) in seen:  # met before in this walk (helpers that call each other): its name
            return f"{value.__module__}.{value.__qualname__}"
        seen.add(id(value))
        return _function(value, depth + 1, seen)
    if isinstance(value, types.MethodType):  # a bound method: its function and the type it is bound to
        return ["method", _captured(value.__func__, depth + 1, seen), f"<{type(value.__self__).__qualname__}>"]
    if isinstance(value, functools.partial):
        return ["partial", _captured(value.func, depth + 1, seen), _captured(value.args, depth + 1, seen),
                sorted([key, _captured(item, depth + 1, seen)] for key, item in value.keywords.items())]
    if isinstance(value, Tensor):
        try:
            written = value._version > 0
        except RuntimeError:  # an inference tensor keeps no version: a constant
            written = False
        return ["tensor", str(value.dtype), list(value.shape)] if written else _plain(value, depth + 1)
    if isinstance(value, _CONSTANT):
        return _plain(value, depth + 1)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _function(value: types.FunctionType, depth: int, seen: set[int]) -> list[Any]:
    """A Python function by its name, its code, its defaults and what it closes over (:func:`_captured`): two
    lambdas, or a function edited between fits, are told apart."""
    cells = []
    for cell in value.__closure__ or ():
        try:
            cells.append(_captured(cell.cell_contents, depth + 1, seen))
        except ValueError:  # a cell not yet filled
            cells.append(None)
    keywords = sorted([name, _captured(item, depth + 1, seen)] for name, item in (value.__kwdefaults__ or {}).items())
    return [f"{value.__module__}.{value.__qualname__}", _code(value.__code__, depth), cells,
            _captured(value.__defaults__, depth + 1, seen), keywords]


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON data that is the same in every process: numbers, strings and containers as they are (sets
    sorted), bytes and a tensor by a hash of their bytes, a Python function, method or partial as
    :func:`_captured` counts it, a class or builtin function by its name, an object with ``to_dict()`` (a
    HuggingFace config) by that, any other object by its type alone (its ``repr`` may hold an address)."""
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
    if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
        return _captured(value, depth, set())
    if isinstance(value, (types.BuiltinFunctionType, type)):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if isinstance(value, bytes):
        return ["bytes", hashlib.sha256(value).hexdigest()]
    if isinstance(value, (set, frozenset)):  # sorted: a set's order changes between processes
        return [type(value).__name__, sorted(json.dumps(_plain(item, depth + 1), sort_keys=True) for item in value)]
    try:
        to_dict = getattr(value, "to_dict", None)
        if callable(to_dict) and not isinstance(value, nn.Module):
            return [type(value).__qualname__, _plain(to_dict(), depth + 1)]
    except Exception:  # a to_dict that fails, an attribute lookup that fails its own way: the type alone
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
