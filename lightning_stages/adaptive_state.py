"""The adaptive state a checkpoint holds (:meth:`~lightning_stages.adaptive_stages.AdaptiveStages.state_dict`), checked
before it is read: a checkpoint may be damaged or written by hand, and what is not of the expected shape must neither
crash a resume nor ``show --checkpoint``. Only plain data is accepted; a string is never taken for a file to open.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_stages.errors import StageProblem
from lightning_stages.plateau import PlateauTracker
from lightning_stages.schedule.adaptive_checks import MODES

__all__ = ["adaptive_state_problems"]

_TRACKER_FIELDS = tuple(PlateauTracker.__dataclass_fields__)
_BEST_FIELDS = ("where", "weights", "path", "step")  # step: a file's global step (absent in older checkpoints)


def _problem(message: str, field: str, value: Any) -> StageProblem:
    return StageProblem(message, name="checkpoint", field=field, value=value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    if _is_int(value):
        return abs(value) <= sys.float_info.max
    return isinstance(value, float) and math.isfinite(value)


def _tracker_problems(tracker: Any) -> list[StageProblem]:
    field = "adaptive.tracker"
    if not isinstance(tracker, Mapping):
        return [_problem(f"must be a mapping, not {type(tracker).__name__}", field, value=tracker)]
    unknown = [key for key in tracker if key not in _TRACKER_FIELDS]
    if unknown or "stage" not in tracker:
        return [_problem(f"must have the fields {', '.join(_TRACKER_FIELDS)} (`stage` at least)", field, tracker)]
    checks = {"stage": _is_int(tracker["stage"]) and tracker["stage"] >= 0,
              "mode": tracker.get("mode", "min") in MODES,
              "min_delta": _is_real(tracker.get("min_delta", 0.0)) and tracker.get("min_delta", 0.0) >= 0,
              "best": tracker.get("best") is None or _is_real(tracker["best"]),
              "best_epoch": _is_int(tracker.get("best_epoch")) or tracker.get("best_epoch") is tracker.get("best") is None,
              "wait": _is_int(tracker.get("wait", 0)) and tracker.get("wait", 0) >= 0,
              "restored": isinstance(tracker.get("restored", False), bool)}
    return [_problem("is not a value the tracker can hold", f"{field}.{key}", value=tracker.get(key))
            for key, fine in checks.items() if not fine]


def _best_weights_problems(best: Any) -> list[StageProblem]:
    field = "adaptive.best_weights"
    if not isinstance(best, Mapping) or any(key not in _BEST_FIELDS for key in best):
        return [_problem(f"must be a mapping with the fields {', '.join(_BEST_FIELDS)}", field, value=best)]
    weights, path = best.get("weights"), best.get("path")
    problems = []
    if weights is not None and not (isinstance(weights, Mapping) and all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items())):
        problems.append(_problem("must be a mapping of names to tensors", f"{field}.weights", value=weights))
    if path is not None and not isinstance(path, str):
        problems.append(_problem("must be the path of a weights file", f"{field}.path", value=path))
    step = best.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        problems.append(_problem("must be the global step the file was written at", f"{field}.step", value=step))
    return problems


def adaptive_state_problems(state: Any) -> list[StageProblem]:
    """What in the ``adaptive`` state of a checkpoint is not of the shape :class:`AdaptiveStages` writes: the state,
    ``transitions``, ``tracker`` or ``best_weights`` of another type, unknown fields, values a tracker cannot hold.
    Whether the transitions fit the schedule is :func:`~lightning_stages.schedule.transitions.transition_problems`.

    Example::

        >>> [str(p) for p in adaptive_state_problems({"tracker": "x"})]
        ["checkpoint: `adaptive.tracker` = 'x': must be a mapping, not str"]
        >>> adaptive_state_problems({"transitions": {0: 3}, "tracker": {"stage": 0, "best": 0.5, "best_epoch": 2}})
        []
    """
    if not isinstance(state, Mapping):
        return [_problem(f"must be a mapping, not {type(state).__name__}", "adaptive", value=state)]
    problems = []
    transitions = state.get("transitions")
    if transitions is not None and not isinstance(transitions, Mapping):
        problems.append(_problem(f"must be a mapping, not {type(transitions).__name__}", "adaptive.transitions",
                                 transitions))
    if state.get("tracker") is not None:
        problems += _tracker_problems(state["tracker"])
    if state.get("best_weights") is not None:
        problems += _best_weights_problems(state["best_weights"])
    return problems
