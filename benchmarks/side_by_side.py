"""Fits side by side: real ``Trainer.fit`` calls in threads of one process, taking turns one optimizer step each,
on one CPU per torch thread. ``run.py`` measures ``cached_distill_ratio`` this way.

Separate fits, one after the other, each with its own epochs, move one repetition's ratio by several percent either
way on a shared machine: its speed drifts over seconds and minutes, and a fit's thread may run on either CPU. Side
by side, the fits share every drift: each step runs right after the other fits' steps, on the same CPU. Each step is
timed over its whole turn: from the moment the fit gets the turn (right after its previous step's
``on_train_batch_end``) to the end of its next ``on_train_batch_end``: the rest of the previous step's hooks, the
loop, the next batch, every hook, the training step, the backward and the optimizer. The first step of an epoch
also carries the previous epoch's end and this epoch's start, so an epoch summed from its steps (as ``run.py``
does) holds one epoch end, alike in every fit.

Only one fit runs at a time; the others wait on a condition variable (no CPU). ``run.py`` adds a second plain fit as
a control: two identical fits measured this way agree within about 1 % per run (0.989 to 1.006 in the fifteenth
session's full run) and 1.000 over 11 runs, where two in threads that were not pinned differed by up to 14 %.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

__all__ = ["TurnTimer", "Turns", "pinned", "side_by_side"]


class Turns:
    """Whose turn it is among named fits, in a cycle; a fit that finished is skipped."""

    def __init__(self, names: list[str]) -> None:
        self.names, self._turn, self._done = list(names), 0, set[str]()
        self._condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self.names[self._turn] == name)

    def next(self, name: str) -> None:
        """Hand the turn on to the next fit that has not finished (``name``'s own if it is the last)."""
        with self._condition:
            count = len(self.names)
            for step in range(1, count + 1):
                candidate = (self._turn + step) % count
                if self.names[candidate] not in self._done or step == count:
                    self._turn = candidate
                    break
            self._condition.notify_all()

    def finish(self, name: str) -> None:
        with self._condition:
            self._done.add(name)
            if self.names[self._turn] == name:
                waiting = [i for i, other in enumerate(self.names) if other not in self._done]
                if waiting:
                    self._turn = waiting[0]
            self._condition.notify_all()


class TurnTimer(Callback):
    """Takes turns with the other fits and times each of its steps over its whole turn: ``(epoch, seconds)``."""

    def __init__(self, name: str, turns: Turns) -> None:
        self.name, self.turns = name, turns
        self.steps: list[tuple[int, float]] = []
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.turns.wait(self.name)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        self.steps.append((trainer.current_epoch, time.perf_counter() - self._start))
        self.turns.next(self.name)
        self.turns.wait(self.name)
        self._start = time.perf_counter()


@contextlib.contextmanager
def pinned(cpus: int) -> Iterator[None]:
    """Run the calling thread, and the threads it starts, on ``cpus`` CPUs (the first it may use); nothing where the
    system cannot pin or allows fewer."""
    if not hasattr(os, "sched_getaffinity"):
        yield
        return
    allowed = os.sched_getaffinity(0)
    if len(allowed) < cpus:
        yield
        return
    os.sched_setaffinity(0, sorted(allowed)[:cpus])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def side_by_side(fits: dict[str, Callable[[Callback], None]], cpus: int) -> dict[str, list[tuple[int, float]]]:
    """Run ``fits`` (``name -> fit(timer)``, each calling ``Trainer.fit`` with ``timer`` among its callbacks) in
    threads taking turns one step each, pinned to ``cpus`` CPUs; each fit's ``(epoch, seconds)`` per step.

    Raises:
        RuntimeError: a fit failed (the others run to their end first).
    """
    turns = Turns(list(fits))
    timers = {name: TurnTimer(name, turns) for name in fits}
    errors: dict[str, BaseException] = {}

    def run(name: str) -> None:
        try:
            fits[name](timers[name])
        except BaseException as err:  # re-raised in the calling thread below
            errors[name] = err
        finally:
            turns.finish(name)

    with pinned(cpus):
        threads = [threading.Thread(target=run, args=(name,), name=f"side-by-side {name}") for name in fits]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"the side-by-side fit {name!r} failed: {err!r}") from err
    return {name: timer.steps for name, timer in timers.items()}
