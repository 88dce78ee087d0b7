"""A pool of ``spawn`` worker processes for ``compare --jobs N``: each imports the training stack once, then trains runs.

Each worker is started once (``multiprocessing`` ``spawn`` context, as on every platform), sets its torch threads
(intra-op and inter-op) to its share of the cores, imports :mod:`~lightning_stages.cli.training_run` (torch,
Lightning), and then trains one :class:`~lightning_stages.cli.training_run.RunSpec` at a time through
:func:`~lightning_stages.cli.training_run.execute_run`, the same function ``--jobs 1`` calls in the ``compare``
process. The parent hands the next run to whichever worker is free, so runs of different lengths keep every worker
busy.

A worker that dies (a segfault, the out-of-memory killer, ``os._exit``) fails only the run it was training: that run
is reported with the worker's exit code, a new worker takes its place, and the other runs go on. Workers ignore
``SIGINT`` (Ctrl-C reaches the ``compare`` process, which stops them); closing the pool, or abandoning a
:meth:`WorkerPool.run` midway (an interrupted comparison), stops the workers, so only the runs in flight are lost.
A worker whose parent is killed outright (``SIGKILL``, ``SIGTERM``) ends at once, its run in flight with it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

from lightning_stages.cli.compare_report import RunOutcome
from lightning_stages.cli.training_run import RunSpec

__all__ = ["WorkerPool"]


def _exit_with(parent_sentinel: Any) -> None:
    """End this worker at once when the ``compare`` process is gone (killed, ``SIGKILL`` or ``SIGTERM``: no cleanup)."""
    wait([parent_sentinel])
    os._exit(1)  # a run in flight is lost, as when the parent stops it; its own processes (DataLoader) follow


def _serve(connection: Connection, threads: int) -> None:
    """A worker's life: set the threads, import the training stack once, then train what arrives until told to stop.

    A thread watches the parent: a worker must not outlive a killed ``compare`` and go on writing into a run folder
    that the next ``compare`` trains the same run in.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), name="parent-watch", daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only possible before any inter-op work; a fresh worker has done none
        torch.set_num_interop_threads(threads)
    from lightning_stages.cli.training_run import execute_run

    while True:
        try:
            spec = connection.recv()
        except (EOFError, OSError):  # the parent closed its end or is gone
            return
        if spec is None:
            return
        outcome = execute_run(spec)
        try:
            connection.send(outcome)
        except (BrokenPipeError, OSError):
            return


@dataclass(eq=False)
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess
    connection: Connection
    run: Optional[RunSpec] = None


def _died(spec: RunSpec, exitcode: Optional[int]) -> RunOutcome:
    how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    return RunOutcome(spec.schedule, spec.seed, error=f"WorkerDied: the worker process training this run died ({how})")


def _stop_worker(worker: _Worker) -> None:
    """A free worker ends by itself once its connection closes; one with a run in flight is killed at once (Lightning
    handles, and ignores, ``SIGTERM`` during a fit: terminating it would wait the whole grace period)."""
    worker.connection.close()
    if worker.run is not None and worker.process.is_alive():
        worker.process.kill()
    worker.process.join(timeout=10)
    if worker.process.is_alive():  # pragma: no cover - a free worker that did not see its connection close
        worker.process.kill()
        worker.process.join()


def _stop_all(pool: list[_Worker]) -> None:
    while pool:
        _stop_worker(pool.pop())


class WorkerPool:
    """``workers`` spawned processes with ``threads`` torch threads each, started when first needed, kept until closed.

    Use it as a context manager; :meth:`run` may be called several times (``--seeds auto`` rounds reuse the workers).

    Args:
        workers: the most processes at once (fewer are started while there are fewer runs).
        threads: torch intra-op and inter-op threads per worker.

    Example::

        >>> with WorkerPool(workers=2, threads=1) as pool:
        ...     list(pool.run([]))   # nothing to train: no worker is started
        []
    """

    def __init__(self, workers: int, threads: int) -> None:
        if workers < 1 or threads < 1:
            raise ValueError(f"a worker pool needs at least one worker and one thread, got {workers} and {threads}")
        self.workers, self.threads = workers, threads
        self._context = multiprocessing.get_context("spawn")
        self._pool: list[_Worker] = []
        self.started = 0  # worker processes started so far (replacements included)
        # a pool never closed would leave its workers waiting for work, and the interpreter joining them at exit
        multiprocessing.util.Finalize(self, _stop_all, args=(self._pool,), exitpriority=10)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers alive now."""
        return [w.process.pid for w in self._pool if w.process.is_alive()]

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        # not a daemon: a run may start processes of its own (DataLoader workers)
        process = self._context.Process(target=_serve, args=(theirs, self.threads), daemon=False,
                                        name=f"lightning-stages-worker-{self.started}")
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        self._pool.append(worker)
        self.started += 1
        return worker

    def _stop(self, worker: _Worker) -> None:
        """End a worker at once (it holds no state worth keeping: a run in flight is lost)."""
        self._pool.remove(worker)
        _stop_worker(worker)

    def close(self) -> None:
        """Stop every worker; a run in flight is lost."""
        _stop_all(self._pool)

    def _hand_out(self, queue: deque[RunSpec]) -> None:
        """Give the next runs to the free workers, starting workers while there are runs and room."""
        while queue:
            worker = next((w for w in self._pool if w.run is None), None)
            if worker is None:
                if len(self._pool) >= self.workers:
                    return
                worker = self._start()
            spec = queue.popleft()
            try:
                worker.connection.send(spec)
            except (BrokenPipeError, OSError):  # it died while free: not the run's fault, give it to another
                queue.appendleft(spec)
                self._stop(worker)
                continue
            worker.run = spec

    def run(self, specs: Sequence[RunSpec]) -> Generator[RunOutcome, None, None]:
        """Train the runs on the workers, yielding each outcome as it finishes (a dead worker's run as failed)."""
        queue = deque(specs)
        try:
            self._hand_out(queue)
            while any(w.run is not None for w in self._pool):
                busy = [w for w in self._pool if w.run is not None]
                wait([w.connection for w in busy] + [w.process.sentinel for w in busy])
                for worker in busy:
                    spec = worker.run
                    if spec is None:  # pragma: no cover - every worker in `busy` has a run
                        continue
                    outcome: Optional[RunOutcome] = None
                    try:
                        if worker.connection.poll():
                            outcome = worker.connection.recv()
                        elif worker.process.is_alive():
                            continue
                    except (EOFError, OSError):
                        pass
                    if outcome is None:  # it died: only its run is lost
                        worker.process.join(timeout=10)
                        outcome = _died(spec, worker.process.exitcode)
                        self._stop(worker)
                    else:
                        worker.run = None
                    self._hand_out(queue)
                    yield outcome
        finally:
            for worker in [w for w in self._pool if w.run is not None]:  # abandoned midway: stop the runs in flight
                self._stop(worker)
