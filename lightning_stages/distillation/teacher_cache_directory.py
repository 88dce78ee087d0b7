"""The directory of a :class:`~lightning_stages.TeacherCache` with ``directory=``, as a whole: its lock, and the key
subdirectories (``tc2-<key>``) that no live process uses, deleted under it (the rows in each key's subdirectory are
:mod:`~lightning_stages.distillation.teacher_cache_files`'s).

* :func:`directory_lock`: the lock held while key subdirectories are made or deleted;
* :func:`tidy`, :func:`drop_unused`: delete what no live process uses;
* :func:`share_like_directory`: a new key subdirectory as writable for the group and others as the directory;
* :func:`remove_file`: delete a file if this process can.

A directory shared by a team (mode 2775) stays usable by every member whatever their umask: the lock file and the
key subdirectories get the directory's group and other write bits.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import warnings
from typing import Optional

from filelock import FileLock, Timeout

__all__ = ["directory_lock", "drop_unused", "remove_file", "share_like_directory", "tidy"]

_KEY_DIR = re.compile(r"tc2-[0-9a-f]{32}")
_LEGACY = re.compile(r"teacher_cache\.json(\.tmp)?|filled\.bin|leaf\d+\.bin")  # the 0.1 single-writer format


def _held(path: str) -> bool:
    """Whether a live process holds the lock file ``path``."""
    lock = FileLock(path, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:
        return True  # cannot tell: keep
    lock.release()
    return False


def remove_file(path: str) -> None:
    """Delete the file ``path`` if this process can: what it cannot delete (a read-only subdirectory, another user's
    files) is kept, since nothing is ever read from another key's files (deleting them only frees space)."""
    with contextlib.suppress(OSError):
        os.remove(path)


def _shared_bits(directory: str) -> int:
    """The group and other write bits of ``directory``'s mode: who may create files in it."""
    return os.stat(directory).st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def share_like_directory(path: str, directory: str) -> None:
    """Give ``path`` (a key's subdirectory, the lock file) the write bits ``directory`` has for its group and others,
    whatever this process's umask (a team's directory, mode 2775: the other members' processes then use it too); one
    of another user is left as it is."""
    with contextlib.suppress(OSError):
        if (bits := _shared_bits(directory)) and os.stat(path).st_uid == os.geteuid():
            os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) | bits)


def directory_lock(directory: str) -> FileLock:
    """The lock of ``directory`` (``.teacher_cache.lock``), held while key subdirectories are made or deleted. Its
    file is as writable for the group and others as the directory is, whatever the umask of the process that made it:
    another user who may write in the directory may also lock it (a lock file made before, by this user: made so)."""
    path = os.path.join(directory, ".teacher_cache.lock")
    share_like_directory(path, directory)  # filelock gives the mode to a file it makes only
    return FileLock(path, mode=0o644 | _shared_bits(directory), thread_local=False)


def drop_unused(directory: str) -> None:
    """Delete the key subdirectories of ``directory`` (and the 0.1 format's files) that no live process uses; warn
    when the directory cannot be locked (nothing deleted)."""
    try:
        with directory_lock(directory):
            tidy(directory, None)
    except OSError as err:
        warnings.warn(f"teacher cache: cannot delete the unused rows in {directory} ({err})", stacklevel=3)


def tidy(root: str, keep: Optional[str]) -> None:
    """Under the directory lock: delete the key subdirectories nobody uses (but ``keep``), the 0.1 format's files,
    and in ``keep`` the temporary files and lock files of dead processes. Shards go first, the directory last."""
    names = os.listdir(root)
    if "teacher_cache.json" in names or "filled.bin" in names:
        for name in names:
            if _LEGACY.fullmatch(name):
                remove_file(os.path.join(root, name))
    for name in names:
        path = os.path.join(root, name)
        if not _KEY_DIR.fullmatch(name) or path == keep:
            continue
        if not os.path.isdir(path):
            remove_file(path)
            continue
        try:
            inside = os.listdir(path)
        except OSError:  # cannot be read (another user's, no permission): kept
            continue
        if any(_held(os.path.join(path, n)) for n in inside if n.endswith(".live")):
            continue
        for suffix in (".rows", ".tmp", ".live"):
            for n in inside:
                if n.endswith(suffix):
                    remove_file(os.path.join(path, n))
        with contextlib.suppress(OSError):
            os.rmdir(path)
    if keep is None or not os.path.isdir(keep):
        return
    for name in os.listdir(keep):
        writer, _, suffix = name.rpartition(".")
        if suffix in ("tmp", "live") and not _held(os.path.join(keep, writer + ".live")):
            remove_file(os.path.join(keep, writer + ".tmp"))
            remove_file(os.path.join(keep, writer + ".live"))
