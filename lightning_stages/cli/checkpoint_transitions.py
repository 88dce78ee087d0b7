"""``lightning-stages show --checkpoint CKPT``: the transitions a run actually took, read from its checkpoint.

The :class:`~lightning_stages.StageScheduleCallback` state holds the schedule the run trained with and, for
plateau-ended stages, the epochs (or optimizer steps) they ended at and the tracker of the stage in progress (see
:mod:`lightning_stages.adaptive_stages`). This module reads them and writes them as text.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any, Union

from lightning_stages.adaptive_state import adaptive_state_problems
from lightning_stages.errors import StageConfigError, StageProblem, printable, short_repr
from lightning_stages.plateau import PlateauTracker
from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.render import format_summary, format_table
from lightning_stages.schedule.stage import stage_name_of
from lightning_stages.schedule.transitions import transition_problems, with_transitions

__all__ = ["callback_state", "format_checkpoint"]


def callback_state(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The ``StageScheduleCallback`` state stored in a Lightning checkpoint.

    Raises:
        StageConfigError: the file cannot be read, or holds no state of the callback.
    """
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError,
            AttributeError, IndexError, UnicodeDecodeError, MemoryError) as err:  # a damaged or foreign file
        reason = type(err).__name__ + (f": {str(err).splitlines()[0]}" if str(err).strip() else "")
        raise StageConfigError(StageProblem(f"cannot read checkpoint {os.fspath(path)!r}: {reason:.300}")) from None
    states = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
    for key, state in (states or {}).items():
        if str(key).startswith("StageScheduleCallback") and isinstance(state, Mapping) and "schedule" in state:
            return dict(state)
    raise StageConfigError(StageProblem(f"{os.fspath(path)}: the checkpoint holds no StageScheduleCallback state",
                                        hint="was it written by a run with the callback?"))


def format_checkpoint(state: Mapping[str, Any]) -> str:
    """The schedule of a run as it actually went: a summary, a line per plateau stage, and the table.

    Example::

        >>> state = {"schedule": {"stage_schedule": [
        ...     {"name": "kd", "start_epoch": 0, "end_epoch": 6, "monitor": "val/loss", "patience": 1},
        ...     {"name": "ft", "start_epoch": 6}], "train": {"epochs": 9}},
        ...     "adaptive": {"transitions": {0: 4}, "tracker": {"stage": 0, "mode": "min", "min_delta": 0.0,
        ...                  "best": 0.5, "best_epoch": 2, "wait": 1, "restored": False}}}
        >>> print(format_checkpoint(state))
        2 stages over 9 epochs (kd [0, 4), ft [4, 9)); no teacher needed
        stage 0 ('kd'): ended at epoch 4 on a plateau of val/loss (cap 6); best 0.5 at epoch 2
        epochs  stage     distillation  lambda
        [0, 4)  kd (1/2)  off           1
        [4, 9)  ft (2/2)  off           1
    """
    saved, adaptive = state.get("schedule"), state.get("adaptive", {})
    problems = [] if isinstance(saved, Mapping) else [  # only a mapping is read: a string is never opened as a file
        StageProblem(f"must be a mapping, not {type(saved).__name__}", name="checkpoint", field="schedule", value=saved)]
    problems += adaptive_state_problems(adaptive)
    if not problems and isinstance(saved, Mapping):
        try:
            schedule = StageSchedule.from_config(saved)
        except StageConfigError as err:
            problems += err.problems
        except (TypeError, ValueError, OverflowError, RecursionError) as err:
            problems.append(StageProblem(f"cannot be read: {printable(err)}", name="checkpoint", field="schedule"))
    if not problems:
        transitions = dict(adaptive.get("transitions") or {})
        problems = transition_problems(schedule, transitions)
    if problems:  # one line, as every problem of the file itself
        raise StageConfigError(StageProblem("the StageScheduleCallback state is damaged: "
                                            + "; ".join(map(str, problems))))
    effective = with_transitions(schedule, transitions)
    saved_tracker = adaptive.get("tracker")
    tracker = PlateauTracker.from_state(saved_tracker) if saved_tracker is not None else None
    lines = [format_summary(effective, ended=set(transitions))]
    unit = schedule.unit  # a step schedule's transitions and best are optimizer steps (``trainer.global_step``)
    for index, stage in enumerate(schedule.stages):
        if not stage.ends_on_plateau:
            continue
        label = f"stage {index} ({short_repr(stage_name_of(stage, index))})"
        cap = schedule.end_of(stage)
        if index in transitions:
            line = (f"{label}: ended at {unit} {transitions[index]} on a plateau of {printable(stage.monitor)} "
                    f"(cap {cap})")
        else:
            line = f"{label}: no early end (yet): runs up to {cap if cap is not None else 'the end'}"
        if tracker is not None and tracker.stage == index and tracker.best is not None:
            line += f"; best {tracker.best:g} at {unit} {tracker.best_epoch}"
            if index not in transitions:
                line += f", {tracker.wait} validation run(s) since"
        lines.append(line)
    lines.append(format_table(effective, ended=set(transitions)))
    return "\n".join(lines)
