"""Per-stage training data: rebuild Lightning's training dataloader exactly where a stage's ``data`` changes.

Lightning builds the training dataloader before ``on_train_start`` and, when it must, again at the start of an
epoch *before* ``on_train_epoch_start`` runs. So the stage of the next epoch is resolved at the end of the previous
one (the schedule is a pure function of the epoch), ``stage_data`` is set then, and the fit loop is told to build
the loader again: dropping its combined loader makes ``fit_loop.setup_data()`` call ``train_dataloader()`` at the
next epoch start, whatever ``reload_dataloaders_every_n_epochs`` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl

__all__ = ["TrainData", "resumed_epoch"]

_UNKNOWN = object()


def resumed_epoch(checkpoint: Mapping[str, Any]) -> Optional[int]:
    """The epoch a run resumed from ``checkpoint`` trains next (its fit loop's processed epochs), ``None`` if unknown.

    A checkpoint written at an epoch's end has counted that epoch as processed; one written inside an epoch has not,
    and the run resumes inside it. Either way the count is the epoch that trains next.

    Example::

        >>> resumed_epoch({"loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 3}}}}})
        3
        >>> resumed_epoch({}) is None
        True
    """
    value: Any = checkpoint
    for key in ("loops", "fit_loop", "epoch_progress", "current", "processed"):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class TrainData:
    """Remembers which ``stage_data`` the current training dataloader was built with, and has it built again when
    the data an epoch wants differs.

    Example::

        >>> tracker = TrainData()
        >>> tracker.built("all"); tracker.built_with
        'all'
    """

    def __init__(self) -> None:
        self.built_with: Any = _UNKNOWN

    def built(self, data: Optional[str]) -> None:
        """The loader Lightning builds next (or has just built) sees ``stage_data == data``."""
        self.built_with = data

    def want(self, trainer: pl.Trainer, data: Optional[str]) -> bool:
        """Make the next epoch's loader one built with ``data``: if the current one was not, drop it so that the fit
        loop builds it again before the next epoch (after the caller has set ``stage_data``). Returns whether it does.
        """
        if self.built_with is _UNKNOWN or self.built_with == data:
            self.built_with = data
            return False
        _drop_train_loader(trainer)
        self.built_with = data
        return True


def _drop_train_loader(trainer: pl.Trainer) -> None:
    fit_loop = trainer.fit_loop
    fetcher = fit_loop._data_fetcher
    if fetcher is not None:  # shut the old loader's workers down now rather than at garbage collection
        fetcher.teardown()
        fit_loop._data_fetcher = None
    fit_loop._combined_loader = None
