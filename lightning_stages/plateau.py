"""``PlateauTracker``: ``EarlyStopping``'s improvement rule for one stage, as plain data (no torch, no Trainer).

After each validation run the stage's ``monitor`` value is given to :meth:`PlateauTracker.update`. A value improves
when it beats the stage's best by more than ``min_delta`` (lower for ``mode="min"``, higher for ``"max"``); a value
that is not finite never improves. :meth:`PlateauTracker.plateaued` says whether ``patience`` runs in a row went
without improvement. The tracker belongs to one stage: a new stage starts a new one, so a best is never carried over.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

__all__ = ["PlateauTracker"]


@dataclass
class PlateauTracker:
    """The best value of one stage's ``monitor``, the epoch it was seen at, and the runs since.

    Args:
        stage: the stage's index as written in ``stage_schedule``.
        mode: ``"min"`` or ``"max"``.
        min_delta: the margin a value must beat the best by (``>= 0``).
        best: the best value so far (``None`` before the first validation).
        best_epoch: the epoch of the best value.
        wait: validation runs since the last improvement.
        restored: whether the stage's best weights were loaded at its end.

    Example::

        >>> t = PlateauTracker(stage=0, mode="min", min_delta=0.1)
        >>> [t.update(v, epoch) for epoch, v in enumerate([1.0, 0.95, 0.8, 0.85])]
        [True, False, True, False]
        >>> t.best, t.best_epoch, t.wait, t.plateaued(2)
        (0.8, 2, 1, False)
    """

    stage: int
    mode: str = "min"
    min_delta: float = 0.0
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    wait: int = 0
    restored: bool = False

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best by more than ``min_delta`` (any finite value beats no best yet)."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value - self.min_delta > self.best
        return value + self.min_delta < self.best

    def update(self, value: float, epoch: int) -> bool:
        """Record one validation run's ``value``; returns whether it improved (and became the best)."""
        if self.improves(value):
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            return True
        self.wait += 1
        return False

    def plateaued(self, patience: int) -> bool:
        """Whether ``patience`` validation runs in a row went without improvement."""
        return self.wait >= patience

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the callback's checkpoint state; :meth:`from_state` reads it back."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PlateauTracker:
        """The tracker :meth:`state_dict` wrote.

        Example::

            >>> t = PlateauTracker(stage=1, mode="max", best=0.5, best_epoch=3, wait=2)
            >>> PlateauTracker.from_state(t.state_dict()) == t
            True
        """
        return cls(**state)
