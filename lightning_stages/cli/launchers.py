"""Where the runs of ``compare`` train: in this process, in a pool of worker processes, or as Ray tasks.

A launcher takes :class:`~lightning_stages.cli.training_run.RunSpec` s and yields their
:class:`~lightning_stages.cli.compare_report.RunOutcome` s as they finish. :class:`LocalLauncher` with one job trains
in this process with every core's torch threads; with more, a :class:`~lightning_stages.cli.worker_pool.WorkerPool`
of that many ``spawn`` processes, each with ``cores // jobs`` threads, started once and fed one run at a time.
Both train each run through the same :func:`~lightning_stages.cli.training_run.execute_run`.
:class:`RayLauncher` submits each run as a Ray task (the extra ``[ray]``). A run that fails is an outcome with its
error; a worker that dies takes only its own run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Generator, Sequence
from dataclasses import replace
from typing import Any, Optional

from lightning_stages.cli.compare_report import RunOutcome
from lightning_stages.cli.training_run import RunSpec, execute_run
from lightning_stages.cli.worker_pool import WorkerPool

__all__ = ["RAY_HINT", "LocalLauncher", "RayConnectError", "RayLauncher", "available_cores", "default_jobs"]

RAY_HINT = "--launcher ray needs Ray: pip install 'lightning-stages[ray]'"


def available_cores() -> int:
    """The CPU cores this process may use.

    Example::

        >>> available_cores() >= 1
        True
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows
        return os.cpu_count() or 1


def default_jobs() -> int:
    """One job per 2 cores (at least one).

    Example::

        >>> default_jobs() == max(1, available_cores() // 2)
        True
    """
    return max(1, available_cores() // 2)


class RayConnectError(ConnectionError):
    """The Ray cluster's address (``RAY_ADDRESS``) is not ``host:port``, or nothing answers there."""


def _check_address(address: str) -> None:
    """Raise :class:`RayConnectError` unless ``address`` is ``host:port`` (or ``ray://host:port``) and accepts a
    connection: Ray itself would retry an unreachable cluster for minutes, or raise a bare ``ValueError``.

    Example::

        >>> _check_address("head")
        Traceback (most recent call last):
        ...
        lightning_stages.cli.launchers.RayConnectError: the Ray address 'head' (RAY_ADDRESS) is not host:port
    """
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayConnectError(f"the Ray address {address!r} (RAY_ADDRESS) is not host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (OSError, ValueError, OverflowError) as err:
        raise RayConnectError(f"no Ray cluster answers at {address!r} (RAY_ADDRESS): {err}") from None


def _failed(spec: RunSpec, err: BaseException) -> RunOutcome:
    return RunOutcome(spec.schedule, spec.seed, error=f"{type(err).__name__}: {err}".strip())


class LocalLauncher:
    """``jobs`` runs at once on this machine, each with ``cores // jobs`` torch threads.

    One job trains in this process; more train in a :class:`~lightning_stages.cli.worker_pool.WorkerPool` of
    ``spawn`` worker processes, each started once (it imports torch and Lightning once) and kept for the whole
    comparison (``--seeds auto`` rounds reuse them). Use it as a context manager.

    Example::

        >>> with LocalLauncher(jobs=1) as launcher:
        ...     launcher.threads == available_cores()
        True
    """

    def __init__(self, jobs: int) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self.threads = max(1, available_cores() // jobs)
        self._pool: Optional[WorkerPool] = WorkerPool(jobs, self.threads) if jobs > 1 else None

    def __enter__(self) -> LocalLauncher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes; a run in flight is lost."""
        if self._pool is not None:
            self._pool.close()

    def run(self, specs: Sequence[RunSpec]) -> Generator[RunOutcome, None, None]:
        """Train the runs, yielding each outcome as it finishes."""
        specs = [replace(spec, threads=self.threads) for spec in specs]
        if self._pool is None:  # in this process: Ctrl-C, or Lightning's sys.exit(1) for it, stops the comparison
            for spec in specs:
                yield execute_run(spec, stop_on_sigterm=True)
            return
        yield from self._pool.run(specs)


class RayLauncher:
    """Each run as a Ray task with ``num_cpus``/``num_gpus``; Ray decides how many run at once, and where.

    Connects to the cluster at ``RAY_ADDRESS`` (``ray.init(address=...)``), else starts a local Ray; a Ray that is
    already initialised is used as it is. Only a Ray started here is shut down at the end. Runs train in the
    driver's working directory (relative paths in configs resolve as they do locally); on a cluster, that directory
    and the configs must exist on every node (a shared file system).

    Raises:
        ImportError: Ray is not installed (the message says how to get it).
        RayConnectError: (on entering) the address is not ``host:port``, or no Ray cluster answers there.
    """

    def __init__(self, num_cpus: float = 1.0, num_gpus: float = 0.0, address: Optional[str] = None) -> None:
        try:
            import ray
        except ImportError:
            raise ImportError(RAY_HINT) from None
        if num_cpus <= 0 or num_gpus < 0:
            raise ValueError(f"Ray needs num_cpus > 0 and num_gpus >= 0 per run, got {num_cpus} and {num_gpus}")
        self._ray = ray
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
        self._started = False
        self._remote: Any = None

    def __enter__(self) -> RayLauncher:
        ray = self._ray
        if not ray.is_initialized():
            if self.address is not None:
                _check_address(self.address)
                try:
                    ray.init(address=self.address)
                except (ValueError, ConnectionError) as err:
                    raise RayConnectError(f"cannot connect to Ray at {self.address!r} (RAY_ADDRESS): {err}") from None
            else:
                env = {"PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)}
                ray.init(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
            self._started = True
        self._remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(execute_run)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Shut Ray down if this launcher started it."""
        if self._started:
            self._ray.shutdown()
            self._started = False

    def run(self, specs: Sequence[RunSpec]) -> Generator[RunOutcome, None, None]:
        """Submit every run as a task, yielding each outcome as it finishes."""
        if self._remote is None:
            raise RuntimeError("use RayLauncher as a context manager: `with RayLauncher() as launcher:`")
        ray, cwd = self._ray, os.getcwd()
        threads = max(1, int(self.num_cpus))
        pending = {self._remote.remote(replace(spec, threads=threads, workdir=cwd)): spec for spec in specs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    spec = pending.pop(ref)
                    try:
                        yield ray.get(ref)
                    except Exception as err:  # the task or its worker died
                        yield _failed(spec, err)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
