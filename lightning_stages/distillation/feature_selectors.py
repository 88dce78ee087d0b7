"""Selectors in hook paths: which tensor of a module's output to capture when the output is not one tensor.

A hook path is a submodule path as in ``named_modules()``, followed by any number of selectors:

* ``[N]`` takes item ``N`` of a tuple or list (``"bert.encoder.layer.3.attention[0]"``);
* ``:name`` takes the key ``name`` of a mapping (a ``ModelOutput`` is one) or else the attribute ``name`` of a
  dataclass, a namedtuple or any other object (``"bert.encoder:last_hidden_state"``).

Selectors chain: ``"bert:hidden_states[2]"`` is the third tensor of ``hidden_states``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Union

from torch import Tensor

__all__ = ["select", "split_hook_path", "tensor_selectors"]

_STEP = re.compile(r"\[(-?\d+)\]|:([A-Za-z_][A-Za-z0-9_]*)")

Step = Union[int, str]


def split_hook_path(path: str) -> tuple[str, tuple[Step, ...]]:
    """Split a hook path into the submodule path and its selectors.

    Raises:
        ValueError: what follows the submodule path is not a chain of ``[N]`` and ``:name`` selectors.

    Example::

        >>> split_hook_path("bert.encoder.layer.3[0]")
        ('bert.encoder.layer.3', (0,))
        >>> split_hook_path("bert.encoder:hidden_states[-1]")
        ('bert.encoder', ('hidden_states', -1))
        >>> split_hook_path("body.0")
        ('body.0', ())
        >>> split_hook_path("bert.encoder[first]")
        Traceback (most recent call last):
        ...
        ValueError: `[first]` is not a selector; use `[N]` (item N of a tuple or list) or `:name` (a key or attribute)
    """
    cut = min((i for i in (path.find("["), path.find(":")) if i >= 0), default=len(path))
    module, rest = path[:cut], path[cut:]
    steps: list[Step] = []
    position = 0
    while position < len(rest):
        match = _STEP.match(rest, position)
        if match is None:
            raise ValueError(f"`{rest[position:]}` is not a selector; use `[N]` (item N of a tuple or list) or "
                             "`:name` (a key or attribute)")
        steps.append(int(match[1]) if match[1] is not None else match[2])
        position = match.end()
    return module, tuple(steps)


def _step(value: Any, step: Step) -> Any:
    if isinstance(step, int):
        if isinstance(value, (tuple, list)):
            return value[step]  # IndexError when out of range
        raise TypeError(f"`[{step}]` needs a tuple or list, not {type(value).__name__}")
    if isinstance(value, Mapping):
        if step in value:
            return value[step]
        raise KeyError(f"`:{step}` is not a key of the {type(value).__name__} (keys: {', '.join(map(str, value))})")
    if not isinstance(value, Tensor) and hasattr(value, step):
        return getattr(value, step)
    raise AttributeError(f"`:{step}` is not an attribute of {type(value).__name__}")


def select(value: Any, steps: tuple[Step, ...]) -> Any:
    """Apply the selectors ``steps`` to a module's output.

    Raises:
        LookupError: a selector does not apply (an index out of range, a missing key or attribute, an index into
            something that is not a tuple or list); the message names the selector.

    Example::

        >>> import torch
        >>> select((torch.zeros(1), {"h": torch.ones(2)}), (1, "h"))
        tensor([1., 1.])
        >>> select((torch.zeros(1),), (3,))
        Traceback (most recent call last):
        ...
        LookupError: `[3]`: index out of range of a tuple of length 1
    """
    for step in steps:
        try:
            value = _step(value, step)
        except IndexError:
            raise LookupError(f"`[{step}]`: index out of range of a {type(value).__name__} of length "
                              f"{len(value)}") from None
        except (TypeError, KeyError, AttributeError) as err:
            raise LookupError(str(err).strip("\"'")) from None
    return value


def tensor_selectors(value: Any, depth: int = 2) -> list[str]:
    """The selectors that take a tensor out of ``value`` (up to ``depth`` levels deep), for error messages.

    Example::

        >>> import torch
        >>> tensor_selectors((torch.zeros(1), None, {"attn": torch.zeros(1)}))
        ['[0]', '[2]:attn']
    """
    if isinstance(value, Tensor) or depth == 0:
        return []
    items: list[tuple[str, Any]] = []
    if isinstance(value, Mapping):
        items = [(f":{k}", v) for k, v in value.items() if isinstance(k, str) and k.isidentifier()]
    elif isinstance(value, (tuple, list)):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f":{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    found: list[str] = []
    for selector, item in items:
        if isinstance(item, Tensor):
            found.append(selector)
        else:
            found += [selector + deeper for deeper in tensor_selectors(item, depth - 1)]
    return found
