"""``AdaptiveStages``: what ``StageScheduleCallback`` keeps for plateau-ended stages and ``restore_best``.

Its state is exactly what resume reads: the transitions a run took (``{stage index: the epoch after its last}``, or
the optimizer step after its last in a step schedule), the current stage's :class:`~lightning_stages.plateau.PlateauTracker` (best value, its epoch, the wait count) and
that stage's :class:`~lightning_stages.best_weights.BestWeights`. The effective schedule is derived from the
transitions by the pure :func:`~lightning_stages.schedule.transitions.with_transitions`, never stored.

* After each validation run of a fit (not the sanity check), the stage's ``monitor`` is read from
  ``trainer.callback_metrics``, averaged over the ranks (so every rank keeps the same tracker), and given to the
  tracker. When ``patience`` runs went without improvement and the stage ran ``min_epochs``, the stage ends at the end
  of this epoch (a decision reduced over the ranks, as finetuning-scheduler's ``_reduce_transition`` does). In a step
  schedule the validated weights are those of the last optimizer step taken (``global_step - 1``); a stage that ran
  ``min_steps`` ends there, and the next stage starts at the next optimizer step (``global_step``).
* At a ``restore_best`` stage's last epoch end (a step stage: before the first optimizer step after it, or at the
  run's end), the best weights are loaded and the optimizers' running state
  (momentum, Adam's moments and step counts) is reset: it was gathered on the weights just discarded. Learning
  rates, parameter groups and LR schedulers are kept (the LR schedule follows the run's epochs).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_stages.adaptive_state import adaptive_state_problems
from lightning_stages.best_weights import BestWeights
from lightning_stages.errors import StageConfigError, StageProblem, did_you_mean
from lightning_stages.plateau import PlateauTracker
from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.stage import Stage, stage_name_of
from lightning_stages.schedule.transitions import transition_problems, with_transitions

__all__ = ["AdaptiveStages", "averaging_reason", "restore_best_problems"]


#: why a ``restore_best`` stage cannot be beside a weight-averaging callback, by its kind
AVERAGED_VALIDATION = ("validation scores the averaged weights, but the stage's best would be the raw ones, and the "
                       "averaged weights replace them at the end of the fit")
AVERAGED_AT_THE_END = "it puts its averaged weights in place of the stage's restored best at the end of the fit"


def averaging_reason(cls: type) -> Optional[str]:
    """Why ``restore_best`` cannot be beside a callback of class ``cls`` (Lightning's ``WeightAveraging``, e.g.
    ``EMAWeightAveraging``, or ``StochasticWeightAveraging``), or ``None``."""
    kinds = getattr(pl.callbacks, "WeightAveraging", None)  # Lightning >= 2.6
    if kinds is not None and issubclass(cls, kinds):
        return AVERAGED_VALIDATION
    return AVERAGED_AT_THE_END if issubclass(cls, pl.callbacks.StochasticWeightAveraging) else None


def averaging_problems(trainer: pl.Trainer, schedule: StageSchedule) -> list[StageProblem]:
    """``restore_best`` stages in a fit with a weight-averaging callback: :func:`restore_best_problems` of the
    Trainer's callbacks."""
    callbacks: list[Any] = getattr(trainer, "callbacks", [])  # set by the Trainer's callback connector
    return restore_best_problems([(type(c).__name__, why) for c in callbacks
                                  if (why := averaging_reason(type(c))) is not None], schedule)


def restore_best_problems(averaging: list[tuple[str, str]], schedule: StageSchedule) -> list[StageProblem]:
    """The problem of each ``restore_best`` stage beside the weight-averaging callbacks ``averaging`` (``(class name,
    why)`` each, see :func:`averaging_reason`).

    Example::

        >>> schedule = StageSchedule([{"name": "ft", "start_epoch": 0, "end_epoch": 2, "monitor": "val_loss",
        ...                            "restore_best": True}])
        >>> [p.field for p in restore_best_problems([("EMAWeightAveraging", AVERAGED_VALIDATION)], schedule)]
        ['restore_best']
    """
    if not averaging:
        return []
    name, why = averaging[0]
    return [StageProblem(f"cannot be used beside {name}: {why}", index=index, name=stage.name, field="restore_best",
                         value=True, hint=f"drop `restore_best` (the {name} callback keeps its own averaged weights), "
                         "or the averaging callback")
            for index, stage in enumerate(schedule.stages) if stage.restore_best]


def _minimum(trainer: pl.Trainer, unit: str) -> int:
    """Where the Trainer may stop at the earliest, in ``unit`` (0: anywhere): after its ``min_epochs`` and its
    ``min_steps`` (Lightning sets ``min_epochs=1`` with any ``min_steps``), the one converted to the other by this
    fit's optimizer steps an epoch (not for a loader without a length: the other is then left out)."""
    batches, epochs, steps = trainer.num_training_batches, trainer.min_epochs or 0, trainer.min_steps or 0
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
    if unit == "step":
        return max(steps, epochs * per_epoch)
    return max(epochs, math.ceil(steps / per_epoch) if per_epoch else 0)


class AdaptiveStages:
    """The run-time state of plateau-ended and ``restore_best`` stages (see the module's docstring).

    Args:
        best_weights: where the best weights are kept, ``"memory"`` or ``"file"``.

    Example::

        >>> adaptive = AdaptiveStages()
        >>> adaptive.state_dict()
        {'transitions': {}, 'tracker': None, 'best_weights': {'where': 'memory', 'weights': None, 'path': None, 'step': None}}
    """

    def __init__(self, best_weights: str = "memory") -> None:
        self.transitions: dict[int, int] = {}
        self.tracker: Optional[PlateauTracker] = None
        self.best = BestWeights(best_weights)
        self._effective: Optional[tuple[Any, StageSchedule, StageSchedule]] = None  # a cache, never stored

    def effective(self, schedule: StageSchedule) -> StageSchedule:
        """The schedule as this run trains it: the bound schedule with the transitions taken so far (derived again
        only when they change)."""
        key = (id(schedule), tuple(sorted(self.transitions.items())))
        if self._effective is None or self._effective[0] != key:
            self._effective = (key, with_transitions(schedule, self.transitions), schedule)  # keeps the id in use
        return self._effective[1]

    # ------------------------------------------------------------------ at the run's events

    def after_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, schedule: StageSchedule) -> bool:
        """Give the stage's ``monitor`` to its tracker, keep the best weights, decide whether the stage ends.

        The validated weights belong to the stage of the epoch (in a step schedule: of the last optimizer step taken,
        ``global_step - 1``); if it ends, the next stage starts at the next epoch (the next optimizer step,
        ``global_step``, or the one after it when the validation fell inside an accumulation of gradients).

        Returns:
            whether a step stage ended here (the callback then resolves the stage again at the next batch).
        """
        if schedule.unit == "step":
            if trainer.global_step == 0:  # no optimizer step yet: no stage has trained these weights
                return False
            position, validated = trainer.global_step, trainer.global_step - 1
            end = position + (1 if trainer.fit_loop.epoch_loop._should_accumulate() else 0)
        else:
            position = validated = trainer.current_epoch
            end = position + 1
        resolved = self.effective(schedule).stage_at(validated)
        if resolved.index is None or schedule.stages[resolved.index].monitor is None:
            return False
        index, stage = resolved.index, schedule.stages[resolved.index]
        value = _reduced(trainer, pl_module, _monitored(trainer, stage, index))
        if self.tracker is None or self.tracker.stage != index:  # a new stage: its best starts afresh
            self.tracker = PlateauTracker(index, stage.mode or "min", float(stage.min_delta or 0.0))
            self.best.clear()
        if self.tracker.update(value, position) and stage.restore_best:
            self.best.save(trainer, pl_module, index)
        if stage.patience is None:
            return False
        least = (stage.min_steps if schedule.unit == "step" else stage.min_epochs) or 1
        ends = self.tracker.plateaued(stage.patience) and end - resolved.start_epoch >= least
        ends = bool(trainer.strategy.reduce_boolean_decision(ends, all=True))
        cap = schedule.end_of(stage)
        if ends and (cap is None or end < cap):
            self.transitions[index] = end
            if self._ends_run(schedule, index):  # nothing follows: the run stops, where the Trainer lets it stop
                # (Trainer(min_epochs=...) or min_steps trains on, as after EarlyStopping: so does this stage)
                stop = max(position if schedule.unit == "step" else end, _minimum(trainer, schedule.unit))
                if cap is not None and stop >= cap:  # not before the stage's own end: it runs to it
                    del self.transitions[index]
                    return False
                self.transitions[index] = stop
                if schedule.unit == "step":  # (an epoch stage stops at its last epoch's end: at_epoch_end)
                    trainer.should_stop = True
            return schedule.unit == "step"
        if self.transitions.get(index) == end:  # an improvement later in the same epoch
            del self.transitions[index]
        return False

    def _ends_run(self, schedule: StageSchedule, index: int) -> bool:
        """Whether stage ``index``'s transition ends the run: it ran to the run's end (or past it: ``max_steps`` or
        ``max_epochs`` cut it) and the base follows it."""
        total = schedule.total_steps if schedule.unit == "step" else schedule.total_epochs
        end = schedule.end_of(schedule.stages[index])
        to_the_end = end == total or (end is not None and total is not None and end > total)
        return to_the_end and self.effective(schedule).stage_at(self.transitions[index]).is_base

    def start_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, schedule: StageSchedule,
                  max_epochs: Optional[int], epoch_end_skipped: bool = False) -> None:
        """At the start of a (resumed) fit, before the first batch: refuse ``restore_best`` beside Lightning's
        ``WeightAveraging`` (:func:`averaging_problems`); do the end of the epoch before, if the fit resumed past it
        (``epoch_end_skipped``: see :func:`epoch_end_skipped`): restore a stage's best weights there; if a plateau
        already ended the run's last stage before the position the run resumes at, stop again at once
        (``Trainer.should_stop`` is not part of a checkpoint).

        Raises:
            StageConfigError: naming each ``restore_best`` stage and the averaging callback.
        """
        if problems := averaging_problems(trainer, schedule):
            raise StageConfigError(problems)
        if epoch_end_skipped and trainer.current_epoch > 0:
            self.at_epoch_end(trainer, pl_module, schedule, max_epochs, epoch=trainer.current_epoch - 1)
        position = trainer.global_step if schedule.unit == "step" else trainer.current_epoch
        if any(end <= position and self._ends_run(schedule, index) for index, end in self.transitions.items()):
            trainer.should_stop = True

    def at_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, schedule: StageSchedule,
                     max_epochs: Optional[int], epoch: Optional[int] = None) -> None:
        """At a stage's last epoch (or the run's): restore its best weights; a plateau of the run's last stage ends
        the run, since nothing follows it. In a step schedule: restore at the run's end (see :meth:`at_step`).
        ``epoch``: the epoch that ended (default: the Trainer's current one)."""
        epoch = trainer.current_epoch if epoch is None else epoch
        step_limit = getattr(trainer, "max_steps", None)  # the run's last epoch: max_epochs', or max_steps' (reached)
        last_of_run = (max_epochs is not None and epoch + 1 >= max_epochs) or (
            step_limit is not None and 0 <= step_limit <= trainer.global_step)
        if schedule.unit == "step":
            max_steps, step = schedule.total_steps, trainer.global_step
            # a plateau of the run's last stage stopped the run here; a stop by another callback (EarlyStopping)
            # keeps the last weights, as in a schedule in epochs
            plateau_ended = any(end == step and self._ends_run(schedule, index) for index, end in self.transitions.items())
            if last_of_run or plateau_ended or (max_steps is not None and step >= max_steps):
                self.at_step(trainer, pl_module, schedule, run_ends=True)
            return
        effective = self.effective(schedule)
        current = effective.stage_at(epoch)  # which stage and where it ends (no ramp: it may need the batch count)
        if current.index is None:
            return
        stage = schedule.stages[current.index]
        if stage.restore_best and (last_of_run or (current.end_epoch is not None and epoch + 1 >= current.end_epoch)):
            self.restore(trainer, pl_module, current.index)
        if self.transitions.get(current.index) == epoch + 1 and self._ends_run(schedule, current.index):
            trainer.should_stop = True

    def at_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, schedule: StageSchedule,
                run_ends: bool = False) -> None:
        """Before an optimizer step of a step schedule (and at the run's end, ``run_ends``): if the stage of the last
        step taken is a ``restore_best`` stage that has ended, restore its best weights (once)."""
        step = trainer.global_step
        if step == 0:
            return
        last = self.effective(schedule).stage_at(step - 1)
        if (last.index is not None and schedule.stages[last.index].restore_best
                and (run_ends or (last.end_epoch is not None and step >= last.end_epoch))):
            self.restore(trainer, pl_module, last.index)

    def restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        """Load stage ``index``'s best weights (once) and reset the optimizers' running state."""
        tracker = self.tracker
        if tracker is not None and tracker.stage == index and tracker.restored:
            return
        validated = tracker is not None and tracker.stage == index
        if tracker is None or tracker.stage != index:  # no validation ran in the stage
            tracker = self.tracker = PlateauTracker(index)
            self.best.clear()
        tracker.restored = True
        if self.best.empty:
            why = "none of its validations gave a finite value" if validated else "no validation ran in it"
            rank_zero_warn(f"StageScheduleCallback: stage {index} has `restore_best` but {why}; its last weights "
                           "are kept.")
            return
        restored = self.best.restore(trainer, pl_module, index)
        self.best.clear()
        if restored:  # the running state was gathered on other weights
            for optimizer in trainer.optimizers:
                optimizer.state.clear()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The transitions, the tracker and the best weights (or their file's path)."""
        return {"transitions": dict(self.transitions),
                "tracker": self.tracker.state_dict() if self.tracker is not None else None,
                "best_weights": self.best.state_dict()}

    def load_state_dict(self, state: dict[str, Any], schedule: StageSchedule) -> None:
        """Resume the transitions, tracker and best weights; transitions that do not fit ``schedule`` (which changed
        since) are dropped with a warning; a damaged state (not of the shape :meth:`state_dict` writes) is dropped
        whole with a warning, and the run resumes without it."""
        damaged = adaptive_state_problems(state)
        if damaged:
            rank_zero_warn("StageScheduleCallback: the adaptive state in the checkpoint could not be read ("
                           + "; ".join(map(str, damaged)) + "); resuming without it (no early ends, no tracker, no "
                           "best weights).")
            self.transitions, self.tracker = {}, None
            self.best.clear()
            return
        transitions = state.get("transitions") or {}
        problems = transition_problems(schedule, transitions)
        if problems:
            rank_zero_warn("StageScheduleCallback: the transitions in the checkpoint do not fit the schedule given "
                           "now; they are dropped: " + "; ".join(map(str, problems)))
            bad = {p.index for p in problems}
            transitions = {k: v for k, v in transitions.items() if k not in bad} if isinstance(transitions, dict) else {}
        self.transitions = dict(transitions)
        tracker = state.get("tracker")
        self.tracker = PlateauTracker.from_state(tracker) if tracker is not None else None
        self.best.load_state_dict(state.get("best_weights") or {})


def _monitored(trainer: pl.Trainer, stage: Stage, index: int) -> float:
    """The stage's ``monitor`` as logged; a clear error naming the stage, the metric and what was logged if absent."""
    metrics = trainer.callback_metrics
    monitor = str(stage.monitor)
    if monitor not in metrics:
        logged = sorted(metrics)
        listing = f"the logged metrics are: {', '.join(logged)}" if logged else "no metric was logged (self.log)"
        close = did_you_mean(monitor, logged)
        raise StageConfigError(StageProblem(
            "was not logged by the end of the stage's first validation", index=index,
            name=stage_name_of(stage, index), field="monitor", value=monitor,
            hint=f"{close} {listing}" if close else listing))
    return float(metrics[monitor])


def _reduced(trainer: pl.Trainer, pl_module: pl.LightningModule, value: float) -> float:
    """``value`` averaged over the ranks (itself on one process)."""
    if trainer.world_size <= 1:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=pl_module.device)
    return float(trainer.strategy.reduce(tensor, reduce_op="mean"))


def epoch_end_skipped(trainer: pl.Trainer) -> bool:
    """Whether this fit resumed from a checkpoint written at the end of an epoch's last batch
    (``ModelCheckpoint(every_n_train_steps=...)``): Lightning (2.6) then goes on with the next epoch and never runs the
    finished one's ``on_train_epoch_end``. Read before the loops' restart flags are reset."""
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    return bool(epoch_loop.restarted_on_train_batch_end and fit_loop.restarted_mid_epoch
                and epoch_loop.batch_progress.is_last_batch)
