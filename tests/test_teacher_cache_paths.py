"""The teacher cache's directory as a path: relative paths and ``os.chdir``, ``~``, arguments that are not
paths, a directory deleted or moved under a running cache, and a kill at every file operation of a re-key.

Every value read back is compared with the teacher run in the test on that sample alone
(``_cache_ddp_worker.reference``).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import multiprocessing
import os
import shutil
import warnings
from pathlib import Path

import _cache_ddp_worker as worker
import pytest
import torch

from lightning_stages import StageConfigError, TeacherCache

FORK = multiprocessing.get_context("fork")  # children start at once, without importing torch again
SAMPLES = 16


def epoch(cache: TeacherCache, seed: int = 7, samples: range = range(SAMPLES)) -> list[bool]:
    """Batches of four ``samples`` as a training epoch does them: read, or run the teacher and store. Every value
    read must be the teacher's own. Returns which batches were read from the cache."""
    teacher, x = worker.make_teacher(seed), worker.inputs()
    read = []
    for index in torch.tensor(samples).split(4):
        found = cache.lookup(index, inputs=x[index])
        if found is None:
            with torch.no_grad():
                cache.store(index, {"t": teacher(x[index])}, {}, inputs=x[index])
        else:
            torch.testing.assert_close(found[0]["t"], worker.reference(teacher, index.tolist()))
        read.append(found is not None)
    return read


def bound(directory, key: str = "k") -> TeacherCache:
    cache = TeacherCache(directory)
    cache.bind(key)
    return cache


def deleted_shards_open() -> list[str]:
    """The shard files this process still has open although they were deleted (Linux's ``/proc``)."""
    links = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # an fd closed while listing
            links.append(os.readlink(fd))
    return [link for link in links if link.endswith(".rows (deleted)")]


# ------------------------------------------------------------------------------------------------ paths


def test_a_relative_directory_is_the_same_directory_after_a_chdir(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    cache = bound("cache")
    assert epoch(cache) == [False] * 4
    monkeypatch.chdir(tmp_path / "elsewhere")  # e.g. a callback or a library changes the working directory mid-fit
    assert epoch(cache) == [True] * 4  # the rows stored before the chdir are still read
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert epoch(bound(tmp_path / "run" / "cache")) == [True] * 4


def test_a_tilde_in_the_directory_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cache = TeacherCache("~/kd")
    assert cache.directory == str(tmp_path / "home" / "kd")
    cache.bind("k")
    epoch(cache)
    assert list((tmp_path / "work").iterdir()) == []  # no directory named "~" in the working directory
    assert epoch(bound(tmp_path / "home" / "kd")) == [True] * 4


@pytest.mark.parametrize("value", [123, "", b""])
def test_a_directory_that_is_not_a_path_or_is_empty_is_refused_naming_it(value):
    with pytest.raises(StageConfigError, match=r"`directory`"):
        TeacherCache(value)


def test_a_directory_given_as_bytes_is_used(tmp_path):
    cache = bound(os.fsencode(tmp_path / "kd"))
    assert epoch(cache) == [False] * 4 and epoch(cache) == [True] * 4
    assert epoch(bound(tmp_path / "kd")) == [True] * 4


@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_a_directory_deleted_or_moved_under_a_running_cache_is_made_again(tmp_path, how):
    cache = bound(tmp_path / "kd")
    epoch(cache)
    if how == "deleted":
        shutil.rmtree(tmp_path / "kd")
    else:
        (tmp_path / "kd").rename(tmp_path / "moved")
    with pytest.warns(UserWarning, match="deleted or moved during the run"):
        assert epoch(cache) == [False] * 4  # the rows went with the directory: computed again, and stored again
    assert epoch(cache) == [True] * 4  # in the directory made again, not in a deleted or moved file
    assert epoch(bound(tmp_path / "kd")) == [True] * 4  # where the next run looks
    if how == "moved":
        assert epoch(bound(tmp_path / "moved")) == [True] * 4  # the moved rows are still right
    if Path("/proc/self/fd").is_dir():
        assert deleted_shards_open() == []  # no rows appended to a deleted file (disk space nobody can see)


@pytest.mark.parametrize("denied", ["remove", "listdir"])
def test_another_key_that_cannot_be_deleted_is_kept_and_the_cache_still_works(tmp_path, monkeypatch, denied):
    old = bound(tmp_path, "old")
    epoch(old, seed=8)
    old.close()
    (stale,) = tmp_path.glob("tc2-*")
    real = getattr(os, denied)

    def refused(path, *args, **kwargs):  # a subdirectory made read-only (remove) or unreadable (listdir)
        if str(path).startswith(str(stale)):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, denied, refused)
    cache = bound(tmp_path, "new")  # deleting the old key is housekeeping: it must not make the cache unusable
    assert epoch(cache) == [False] * 4 and epoch(cache) == [True] * 4
    cache.clear()  # no raw PermissionError either
    monkeypatch.undo()
    cache.close()
    assert epoch(bound(tmp_path, "old"), seed=8) == [True] * 4  # kept, and still its own teacher's rows


def test_clearing_a_directory_that_cannot_be_locked_warns_instead_of_raising(tmp_path):
    cache = bound(tmp_path / "kd")
    epoch(cache)
    cache.close()
    lock = tmp_path / "kd" / ".teacher_cache.lock"
    lock.unlink()
    lock.mkdir()  # opening the lock file fails (as for a lock file of another user)
    with pytest.warns(UserWarning, match="cannot delete the unused rows"):
        TeacherCache(tmp_path / "kd").clear()


# ------------------------------------------------------------------------------------------------ kills


def _die_at(count: int, directory: str) -> None:
    """Bind key ``b`` over a directory of key ``a`` and store samples 0..15, dying (``os._exit``) just before the
    ``count``-th call that changes a file or a lock: every ``mkdir``, ``open`` for writing, ``write``, ``rename``,
    ``remove``, ``rmdir`` and ``flock`` of the re-key and of the fill."""
    torch.set_num_threads(1)  # a forked child: OpenMP's threads did not survive the fork
    calls = [0]

    def counted(function):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == count:
                os._exit(77)
            return function(*args, **kwargs)

        return call

    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    opened = builtins.open
    for name in ("mkdir", "write", "rename", "replace", "remove", "unlink", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))
    fcntl.flock = counted(fcntl.flock)
    os_open = os.open
    os.open = lambda path, flags, *a, **k: (counted(os_open) if flags & writes else os_open)(path, flags, *a, **k)
    builtins.open = lambda f, mode="r", *a, **k: (counted(opened) if set(mode) & set("wax+") else opened)(f, mode, *a, **k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        epoch(bound(directory, "b"), seed=8)
    os._exit(0)


def _check(directory: str, results) -> None:
    """Each key's rows that a new process serves are its teacher's own (``epoch`` compares), for both keys."""
    torch.set_num_threads(1)
    found = {}
    for key, seed in (("a", 7), ("b", 8)):
        cache = bound(directory, key)
        epoch(cache, seed)  # reads what is left, computes the rest
        found[key] = epoch(cache, seed)
        cache.close()
    results.put(found)


def test_a_kill_at_every_file_operation_of_a_re_key_leaves_a_directory_read_right_or_dropped(tmp_path):
    dying = 0
    for count in range(1, 100):
        directory = tmp_path / str(count)
        for half in (range(8), range(8, SAMPLES)):  # two shards of key a, by two runs that ended
            cache = bound(directory, "a")
            epoch(cache, samples=half)
            cache.close()
        child = FORK.Process(target=_die_at, args=(count, str(directory)))
        child.start()
        child.join(timeout=60)
        assert child.exitcode in (0, 77), child.exitcode
        results = FORK.Queue()
        check = FORK.Process(target=_check, args=(str(directory), results))
        check.start()
        found = results.get(timeout=60)  # no hang on a lock left by the dead process; no exception (no result)
        check.join(timeout=60)
        assert check.exitcode == 0 and found == {"a": [True] * 4, "b": [True] * 4}, (count, found)
        shutil.rmtree(directory)
        if child.exitcode == 0:  # the count is past the last operation: every one was a kill point
            break
        dying += 1
    assert dying > 20  # the re-key's and the fill's operations were all reached
