"""``IndexedDataset``: a dataset whose items also carry their index, for the teacher cache."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

__all__ = ["IndexedDataset"]


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

        >>> import torch
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
