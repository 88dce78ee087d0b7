"""Find the trainable parameters a loss leaves unused, and keep them in its graph with a zero term.

``DistributedDataParallel`` (with its default ``find_unused_parameters=False``) expects every trainable parameter
to get a gradient in every backward pass. A stage that does not use part of the model (a feature adapter while
fine-tuning, say) breaks that expectation. These pure functions let the plugin find the unused parameters once
per stage, by walking the autograd graph of the stage's loss, and add ``0`` times them on every step of the stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["keep_in_graph", "reached_leaves", "unreached_parameters"]


def reached_leaves(output: Tensor) -> set[int]:
    """The ``id`` of every leaf tensor (e.g. parameter) that a backward pass from ``output`` would reach.

    Example::

        >>> a = torch.ones(2, requires_grad=True)
        >>> b = torch.ones(2, requires_grad=True)
        >>> reached_leaves((a * 3).sum()) == {id(a)}
        True
        >>> id(b) in reached_leaves((a * b).sum())
        True
    """
    reached: set[int] = set()
    if output.grad_fn is None:
        if output.requires_grad:
            reached.add(id(output))
        return reached
    seen: set[Any] = set()
    stack: list[Any] = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the node that writes a leaf's .grad
        if variable is not None:
            reached.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return reached


def unreached_parameters(output: Tensor, parameters: Iterable[Tensor]) -> list[Tensor]:
    """The trainable ``parameters`` (``requires_grad``) that a backward pass from ``output`` would not reach.

    Example::

        >>> from torch import nn
        >>> used, adapter = nn.Linear(2, 1), nn.Linear(2, 2)
        >>> loss = used(torch.ones(1, 2)).sum()
        >>> [tuple(p.shape) for p in unreached_parameters(loss, [*used.parameters(), *adapter.parameters()])]
        [(2, 2), (2,)]
    """
    reached = reached_leaves(output)
    return [p for p in parameters if p.requires_grad and id(p) not in reached]


class _KeepInGraph(torch.autograd.Function):
    """Returns ``0``; its backward gives every input a zero gradient (never NaN, whatever the values are)."""

    @staticmethod
    def forward(ctx: Any, *params: Tensor) -> Tensor:
        ctx.save_for_backward(*params)
        return torch.zeros((), dtype=params[0].dtype, device=params[0].device)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        return tuple(torch.zeros_like(p) for p in ctx.saved_tensors)


def keep_in_graph(output: Tensor, parameters: Sequence[Tensor]) -> Tensor:
    """``output + 0``, where the ``0`` depends on ``parameters``: a backward pass gives each a zero gradient.

    The value of ``output`` is unchanged, and its gradients to everything else are unchanged. Costs no forward
    work beyond one scalar; the backward writes one zero tensor per parameter.

    Example::

        >>> w = torch.ones(3, requires_grad=True)
        >>> loss = keep_in_graph(torch.tensor(2.0, requires_grad=True), [w])
        >>> loss.item()
        2.0
        >>> loss.backward(); w.grad
        tensor([0., 0., 0.])
    """
    if not parameters:
        return output
    return output + _KeepInGraph.apply(*parameters)
