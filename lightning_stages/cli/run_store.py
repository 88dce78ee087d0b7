"""The finished runs of a comparison on disk: ``OUT/runs/<schedule>/seed_<n>/result.json``, and ``OUT``'s lock.

Each finished run's result (metrics, curves, seconds, costs, error) is written with the fingerprint of its config
(:mod:`~lightning_stages.cli.run_fingerprint`) and the versions of the packages it trained with.
A later ``compare`` into the same ``OUT`` reuses a result whose fingerprint matches, that is well formed and the
run of its folder, and that has every metric asked for, and trains the rest. A run that failed is trained again.
The result is written last, atomically, so a run killed in flight leaves no result and is trained again next time.
Each schedule's folder is named after its config's file alone (:func:`~lightning_stages.cli.run_names.schedule_names`:
one folder name, never ``.`` or ``..``), so that it does not change with the other configs of a comparison; one
``compare`` at a time holds ``OUT``'s lock (:func:`lock_out`), which also refuses an ``OUT/runs`` that is no folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from filelock import FileLock, Timeout

from lightning_stages.cli.compare_report import MISSING_METRIC, RunOutcome
from lightning_stages.cli.run_fingerprint import config_fingerprint
from lightning_stages.cli.run_names import is_folder_name, schedule_names

__all__ = ["FINGERPRINT_FORMAT", "LOCK_FILE", "RESULT_FILE", "OutputInUseError", "adopt_fingerprint", "config_fingerprint", "finished_bytes",
           "load_result", "lock_out", "package_versions", "record_result", "replaced_runs", "restore_result", "run_dir",
           "save_result", "schedule_names", "version_note"]

RESULT_FILE = "result.json"
#: in each result.json this version writes: its fingerprint counts the model's code and the modules it imports
FINGERPRINT_FORMAT = 2
#: the lock file in ``OUT`` that a running ``compare`` holds
LOCK_FILE = ".compare.lock"


class OutputInUseError(RuntimeError):
    """Another ``compare`` is writing into the same output directory."""


@contextlib.contextmanager
def lock_out(out: Path) -> Iterator[None]:
    """Hold ``OUT/.compare.lock`` (an OS lock: a killed process releases it), or raise :class:`OutputInUseError`;
    also when ``OUT/runs``, where the run folders go, is a file (or a broken link): nothing is trained then."""
    lock = FileLock(str(out / LOCK_FILE), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise OutputInUseError(f"another compare is writing into {out} (it holds {out / LOCK_FILE}); wait for it "
                               "to finish or give another --out") from None
    try:
        runs = out / "runs"
        if (runs.exists() or runs.is_symlink()) and not runs.is_dir():  # a user's file: not removed, named
            raise OutputInUseError(f"--out {out} cannot hold its run folders: {runs} is not a folder; move it or "
                                   "give another --out")
        yield
    finally:
        lock.release()


def run_dir(out: Union[str, os.PathLike], schedule: str, seed: int) -> Path:
    """The folder of one run; ``ValueError`` for a ``schedule`` that is not one folder name (``..``, ``a/b``).

    Example::

        >>> run_dir("out", "joint", 2).as_posix()
        'out/runs/joint/seed_2'
    """
    if not is_folder_name(schedule):  # else OUT/runs/./seed_0 would be another schedule's folder
        raise ValueError(f"the schedule name {schedule!r} is not one folder name (schedule_names gives such names)")
    return Path(out) / "runs" / schedule / f"seed_{seed}"


_PACKAGES = ("lightning-stages", "lightning", "torch")


def package_versions() -> dict[str, str]:
    """The versions of the packages a run trains with (those installed).

    Example::

        >>> sorted(package_versions())
        ['lightning', 'lightning-stages', 'torch']
    """
    found = {}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def version_note(folders: Sequence[Path]) -> Optional[str]:
    """A warning when reused runs (their folders) were trained with other package versions than now, else ``None``.

    Results written before versions were saved are not counted: their versions are not known.
    """
    now, other, seen = package_versions(), 0, set()
    for folder in folders:
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            saved = json.loads((Path(folder) / RESULT_FILE).read_text(encoding="utf-8")).get("versions")
            changed = {(k, str(v)) for k, v in dict(saved).items() if k in now and now[k] != str(v)}
            other += bool(changed)
            seen |= changed
    if not other:
        return None
    then = ", ".join(f"{k} {v} (now {now[k]})" for k, v in sorted(seen))
    return (f"compare: {other} of the reused runs trained with other versions: {then}; their results may differ from a "
            "run now (--fresh trains every run again)")


def save_result(folder: Union[str, os.PathLike], run: RunOutcome, fingerprint: str) -> Path:
    """Write ``result.json`` into the run folder, atomically (a temporary file, then a rename).

    Example::

        >>> import tempfile
        >>> folder = run_dir(tempfile.mkdtemp(), "a", 0)
        >>> path = save_result(folder, RunOutcome("a", 0, metrics={"test/iou": 0.5}), "f1")
        >>> load_result(folder, "f1", ["test/iou"]).metrics
        {'test/iou': 0.5}
        >>> load_result(folder, "f2", ["test/iou"]) is None   # another config
        True
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"fingerprint": fingerprint, "fingerprint_format": FINGERPRINT_FORMAT, **dataclasses.asdict(run),
            "versions": package_versions()}
    data.pop("reused", None)
    return _write_result(folder, json.dumps(data, indent=1).encode("utf-8"))


def _write_result(folder: Path, content: bytes) -> Path:
    """Write ``content`` as the folder's ``result.json`` atomically (a temporary file, then a rename)."""
    tmp = folder / f".{RESULT_FILE}.tmp"
    tmp.write_bytes(content)
    os.replace(tmp, folder / RESULT_FILE)
    return folder / RESULT_FILE


def finished_bytes(folder: Union[str, os.PathLike]) -> Optional[bytes]:
    """The content of the folder's ``result.json`` if it holds a finished run (of whatever config), else ``None``."""
    try:
        raw = (Path(folder) / RESULT_FILE).read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError):
        return None
    return raw if isinstance(data, dict) and data.get("error") is None else None


def record_result(folder: Union[str, os.PathLike], run: RunOutcome, fingerprint: str, earlier: Optional[bytes]) -> None:
    """:func:`save_result`, except that a failed run puts back the ``result.json`` of the finished run it was to
    replace (``earlier``): a run that fails (a config made invalid, say) does not cost the result of the config as it
    was, which a later ``compare`` of that config reuses. The report shows the failure.
    """
    if run.error is None or earlier is None:
        save_result(folder, run, fingerprint)
        return
    _write_result(Path(folder), earlier)


def adopt_fingerprint(folder: Union[str, os.PathLike], fingerprint: str) -> None:
    """Give a reused ``result.json`` the fingerprint it is reused under now (the rest as it was, atomically).

    A result saved before the model's code counted is reused under its fingerprint without code; from then on it
    stands for the code as it is now, so a later edit of that code makes it stale (else it would be reused for ever).

    Example::

        >>> import tempfile
        >>> folder = run_dir(tempfile.mkdtemp(), "a", 0)
        >>> _ = save_result(folder, RunOutcome("a", 0, metrics={"test/iou": 0.5}), "old")
        >>> adopt_fingerprint(folder, "new")
        >>> load_result(folder, "old", []) is None, load_result(folder, "new", []).metrics
        (True, {'test/iou': 0.5})
    """
    path = Path(folder) / RESULT_FILE
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("fingerprint") == fingerprint:
            return
        data["fingerprint"], data["fingerprint_format"] = fingerprint, FINGERPRINT_FORMAT
        _write_result(Path(folder), json.dumps(data, indent=1).encode("utf-8"))


def restore_result(folder: Union[str, os.PathLike], earlier: bytes) -> None:
    """Put ``earlier`` back as the folder's ``result.json`` if it has none now (its rerun emptied the folder and was
    interrupted); a run not started yet still has its own and is left alone."""
    folder = Path(folder)
    if (folder / RESULT_FILE).exists() or not folder.is_dir():
        return
    with contextlib.suppress(OSError):
        _write_result(folder, earlier)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pairs(value: Any, first: Any, second: Any) -> bool:
    """Whether ``value`` is a list of 2-element lists whose items pass ``first`` and ``second``."""
    return isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 and first(p[0]) and second(p[1])
                                           for p in value)


#: what each field of a saved result must be (missing fields take their defaults)
_FIELDS = {
    "schedule": lambda v: isinstance(v, str),
    "seed": _count,
    "metrics": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items()),
    "curves": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _pairs(x, _count, _number)
                                                    for k, x in v.items()),
    "seconds": _number,
    "boundaries": lambda v: _pairs(v, _count, lambda name: isinstance(name, str)),
    "distill_seconds": _number,
    "other_seconds": _number,
    "teacher_forwards": _count,
    "teacher_samples": _count,
}


def replaced_runs(out: Union[str, os.PathLike], schedule: str, seeds: Sequence[int],
                  fingerprint: Union[str, Sequence[str]]) -> Optional[str]:
    """A warning naming the finished runs of ``schedule`` that a changed config (or a file it names) makes stale,
    and that training it again replaces; ``None`` when there are none.

    Example::

        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> _ = save_result(run_dir(out, "a", 1), RunOutcome("a", 1, metrics={"test/iou": 0.5}), "f1")
        >>> replaced_runs(out, "a", [0, 1], "f1") is None
        True
        >>> print(replaced_runs(out, "a", [0, 1], "f2").split(";")[0].replace(out, "OUT"))
        compare: a: the config, a file it names or its model's code changed since seed 1 was trained into OUT
    """
    stale = []
    for seed in seeds:
        try:
            data = json.loads((run_dir(out, schedule, seed) / RESULT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and not _matches(data, fingerprint) and data.get("error") is None:
            stale.append(seed)
    if not stale:
        return None
    return (f"compare: {schedule}: the config, a file it names or its model's code changed since "
            f"seed{'s' if len(stale) > 1 else ''} {', '.join(map(str, stale))} "
            f"{'were' if len(stale) > 1 else 'was'} trained into {out}; training "
            f"{'them' if len(stale) > 1 else 'it'} again replaces the earlier result{'s' if len(stale) > 1 else ''} "
            "(kept where the new run fails)")


def _matches(data: dict, fingerprint: Union[str, Sequence[str]]) -> bool:
    """Whether a ``result.json``'s fingerprint is ``fingerprint``. Of several, the first is the current one; the others
    (what earlier versions computed for the same config: before the model's code, or the modules it imports,
    counted) match only a result such a version saved, one without ``fingerprint_format``: a result this version
    saved without code (its model module lay outside the working directory then) is never taken for one."""
    found = data.get("fingerprint")
    if isinstance(fingerprint, str):
        return found == fingerprint
    current, *earlier = fingerprint
    return found == current or (found in earlier and "fingerprint_format" not in data)


def load_result(folder: Union[str, os.PathLike], fingerprint: Union[str, Sequence[str]],
                metrics: Sequence[str]) -> Optional[RunOutcome]:
    """The run's finished result if it is the run of this folder and config; else ``None`` (the run is trained again).

    That is: ``result.json`` parses, its fingerprint is ``fingerprint`` (or one of them, see :func:`_matches`), it did not fail (but for a missing metric), every field has its type (numbers
    for metrics and seconds, ``[epoch, value]`` curve points, ``[epoch, name]`` boundaries), its ``schedule`` and
    ``seed`` are those of the folder ``runs/<schedule>/seed_<seed>``. A run without one of ``metrics`` is returned
    failed, with the error a new run would give: the same config logs the same metrics, so training it again would
    only delete a finished run (``compare --fresh`` does that on purpose).

    Example::

        >>> import tempfile
        >>> load_result(tempfile.mkdtemp(), "f1", ["test/iou"]) is None
        True
    """
    folder = Path(folder)
    try:
        data = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    error = data.get("error") if isinstance(data, dict) else None  # a run without a metric of --metrics is kept
    if not isinstance(data, dict) or not _matches(data, fingerprint) or not (
            error is None or (isinstance(error, str) and error.startswith(MISSING_METRIC))):
        return None
    known = {k: v for k, v in data.items() if k in _FIELDS}
    if not {"schedule", "seed"} <= set(known) or not all(_FIELDS[k](v) for k, v in known.items()):
        return None
    if known["schedule"] != folder.parent.name or folder.name != f"seed_{known['seed']}":
        return None
    run = RunOutcome(**known)
    run.check_metrics(metrics)  # e.g. a misspelt --metrics: reported as a new run would report it, the run kept
    run.curves = {k: [(int(p[0]), float(p[1])) for p in v] for k, v in run.curves.items()}
    run.boundaries = [(int(b[0]), str(b[1])) for b in run.boundaries]
    run.metrics = {k: float(v) for k, v in run.metrics.items()}
    run.reused = True
    return run
