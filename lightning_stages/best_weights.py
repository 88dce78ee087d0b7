"""``BestWeights``: the student's weights at its stage's best validation, kept until the stage ends.

Two places, chosen with ``StageScheduleCallback(best_weights=...)``:

* ``"memory"`` (default): a CPU copy of ``pl_module.state_dict()``, one model's worth of host memory while a
  ``restore_best`` stage runs; it is also written into every checkpoint taken during the stage (a checkpoint grows
  by one copy of the student), which is what lets a resumed run restore the same weights.
* ``"file"``: ``<trainer.log_dir>/best_weights/stage_<index>.pt``, written by rank zero at each improvement (one
  ``torch.save`` of the student and the global step); the checkpoint holds only its path and that step. Under DDP
  every rank reads that file at the stage's end, so the log dir must be on a file system all ranks see (as for
  ``ModelCheckpoint``). A file that holds another step's weights than the checkpoint names (a run resumed from an
  earlier checkpoint, after the original run improved again) is not loaded, with a warning.

Teachers are never stored: a :class:`~lightning_stages.DistillationModule` keeps them out of ``state_dict()``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_stages.errors import StageProblem, did_you_mean, short_repr

_MARK = "lightning_stages_best_weights"  # a file of this module: {_MARK: 1, "step": ..., "weights": ...}

__all__ = ["BEST_WEIGHTS_PLACES", "BestWeights", "best_weights_problem", "misfit", "student_weights"]

BEST_WEIGHTS_PLACES = ("memory", "file")


def best_weights_problem(value: Any, name: str) -> Optional[StageProblem]:
    """What is wrong with a ``best_weights`` argument (``None``: it is ``"memory"`` or ``"file"``).

    Example::

        >>> print(best_weights_problem("fiel", "StageScheduleCallback"))
        StageScheduleCallback: `best_weights` = 'fiel': must be 'memory' or 'file'; did you mean `file`?
    """
    if value in BEST_WEIGHTS_PLACES:
        return None
    return StageProblem("must be 'memory' or 'file'", name=name, field="best_weights", value=value,
                        hint=did_you_mean(value, BEST_WEIGHTS_PLACES) if isinstance(value, str) else None)


def student_weights(pl_module: torch.nn.Module) -> dict[str, Any]:
    """A CPU copy of the module's ``state_dict()`` (teachers are not part of it), independent of later training: its
    tensors copied to the CPU, any other value (a submodule's ``get_extra_state()``) deep-copied.

    Example::

        >>> layer = torch.nn.Linear(2, 1)
        >>> copy = student_weights(layer)
        >>> _ = torch.nn.init.zeros_(layer.weight)
        >>> bool(copy["weight"].abs().sum() > 0)
        True
    """
    return {key: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for key, value in pl_module.state_dict().items()}


def misfit(weights: Any, pl_module: torch.nn.Module) -> Optional[str]:
    """Why ``weights`` cannot be the module's best weights (``None``: they can): not a mapping of names to tensors
    (any value where the module's own is not a tensor: a submodule's extra state), names the module lacks or misses
    (unless its ``strict_loading`` is off), another shape, NaN or infinite values in a trainable parameter.

    Example::

        >>> layer = torch.nn.Linear(2, 1)
        >>> misfit(student_weights(layer), layer) is None
        True
        >>> misfit({"weight": torch.zeros(3), "bias": torch.zeros(1)}, layer)
        '`weight` has the shape (3,), the module (1, 2)'
    """
    own, trainable = pl_module.state_dict(), {name for name, p in pl_module.named_parameters() if p.requires_grad}
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and (isinstance(v, torch.Tensor) or (k in own and not isinstance(own[k], torch.Tensor)))
            for k, v in weights.items()):
        return "they are not a mapping of names to tensors"
    if getattr(pl_module, "strict_loading", True):
        if missing := sorted(set(own) - set(weights)):
            return f"they lack {short_repr(missing)}"
        if unknown := sorted(set(weights) - set(own)):
            return f"they hold {short_repr(unknown)}, which the module does not have"
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):  # extra state: the module's own to judge when it is loaded
            continue
        if isinstance(own.get(key), torch.Tensor) and tuple(value.shape) != tuple(own[key].shape):
            return f"`{key}` has the shape {tuple(value.shape)}, the module {tuple(own[key].shape)}"
        if key in trainable and not bool(torch.isfinite(value).all()):  # a buffer may hold -inf (a mask)
            return f"`{key}` holds NaN or infinite values"
    return None


class BestWeights:
    """The best weights of the stage being trained, in memory or in a file (see the module's docstring).

    Args:
        where: ``"memory"`` or ``"file"``.

    Example::

        >>> store = BestWeights()
        >>> store.empty
        True
    """

    def __init__(self, where: str = "memory") -> None:
        self.where = where
        self.weights: Optional[dict[str, Any]] = None
        self.path: Optional[str] = None
        self.step: Optional[int] = None  # the global step the file's weights were saved at

    @property
    def empty(self) -> bool:
        """Whether nothing is stored."""
        return self.weights is None and self.path is None

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: int) -> None:
        """Keep the module's current weights as the best of stage ``stage``."""
        if self.where == "memory":
            self.weights = student_weights(pl_module)
            return
        path = Path(trainer.log_dir or trainer.default_root_dir) / "best_weights" / f"stage_{stage}.pt"
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            torch.save({_MARK: 1, "step": trainer.global_step, "weights": student_weights(pl_module)}, partial)
            os.replace(partial, path)  # a file that exists is whole
        self.path, self.step = str(path), trainer.global_step

    def restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: int = 0) -> bool:
        """Load the stored weights into the module; every rank loads the same ones. Nothing stored: nothing done.

        Returns whether weights were loaded: not when the file holds the weights of another step than the one this
        store saved (a run resumed from an earlier checkpoint, after the original run overwrote the file), nor when
        they cannot be read or do not fit the module (a file moved, deleted or damaged since; a checkpoint edited by
        hand): each is warned about, naming stage ``stage``, and every rank then keeps its last weights."""
        why = stale = None
        if self.path is not None:
            trainer.strategy.barrier("lightning_stages.best_weights")  # rank zero's file is written
            try:
                weights: Any = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as err:  # missing, unreadable, not a torch file: whatever torch.load raises for it
                weights, why = None, f"the file {self.path!r} cannot be read ({type(err).__name__}: {err})"
            if isinstance(weights, dict) and weights.get(_MARK) == 1:
                if self.step is not None and weights.get("step") != self.step:
                    why = stale = (f"StageScheduleCallback: the best-weights file {self.path!r} holds the weights of "
                                   f"step {weights.get('step')}, not those of step {self.step} that the resumed "
                                   "checkpoint names: a later improvement of the run it came from overwrote them. The "
                                   "stage's last weights are kept.")
                weights = weights.get("weights")  # else a file written before it held the step: the weights
        else:
            weights = self.weights
            if trainer.world_size > 1:  # equal on every rank under DDP anyway; rank zero's copy makes it certain
                weights = trainer.strategy.broadcast(weights, src=0)
            if weights is None:
                return False
        why = why or misfit(weights, pl_module)
        fits = why is None
        if trainer.world_size > 1:  # every rank restores, or none does (a file only some ranks can read)
            fits = bool(trainer.strategy.reduce_boolean_decision(fits, all=True))
        if not fits:
            rank_zero_warn(stale or f"StageScheduleCallback: the best weights of stage {stage} cannot be restored: "
                           f"{why or 'another process could not read them'}. The stage's last weights are kept.")
            return False
        pl_module.load_state_dict(weights, strict=getattr(pl_module, "strict_loading", True))
        return True

    def clear(self) -> None:
        """Forget the stored weights (a file stays on disk)."""
        self.weights, self.path, self.step = None, None, None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds: the weights (``"memory"``) or the file's path and the step it was saved at
        (``"file"``)."""
        return {"where": self.where, "weights": self.weights, "path": self.path, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the stored weights of a checkpoint (kept where this store keeps them)."""
        self.weights, self.path, self.step = state.get("weights"), state.get("path"), state.get("step")
