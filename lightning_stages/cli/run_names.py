"""The name of each schedule's run folder ``OUT/runs/<schedule>/`` (:func:`schedule_names`).

A schedule is named after its config's file alone, so that its folder does not change with the other configs of a
comparison and a later ``compare`` reuses its finished runs. Every name is one folder name that stays inside
``OUT/runs`` (:func:`folder_name`): a file name that is not one as it is (``..yaml``: ``.``; ``...yaml``: ``..``;
``.hidden.yaml``), or is longer than :data:`MAX_NAME_BYTES`, gets a readable prefix and a hash of the name instead.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Union

__all__ = ["MAX_NAME_BYTES", "folder_name", "is_folder_name", "schedule_names"]

#: the longest schedule name (UTF-8 bytes) kept as its run folder's name; a longer one is shortened (a hash added)
MAX_NAME_BYTES = 255  # the longest file name most file systems allow
#: the bytes of a shortened name kept before its hash
_PREFIX_BYTES = 60
_SEPARATORS = tuple(s for s in ("/", "\0", os.sep, os.altsep) if s)


def _decoded(name: str) -> str:
    r"""``name`` with the bytes a file name had that were not UTF-8 (surrogate escapes) written as ``\xff``.

    Example::

        >>> _decoded(b"caf\xe9".decode("utf-8", "surrogateescape"))
        'caf\\xe9'
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _bytes(name: str) -> bytes:
    return name.encode("utf-8", "backslashreplace")  # never fails, not even on a lone surrogate


def is_folder_name(name: str) -> bool:
    """Whether ``name`` is one path component that names a folder of its own: not empty, ``.`` or ``..``, and
    without a path separator or a NUL.

    Example::

        >>> [is_folder_name(n) for n in ("a", ".", "..", "", "a/b", ".a")]
        [True, False, False, False, False, True]
    """
    return name not in ("", ".", "..") and not any(s in name for s in _SEPARATORS)


def folder_name(name: str) -> str:
    """``name`` as a run folder's name: itself when it is one folder name (:func:`is_folder_name`) that does not
    start with ``.`` and has at most :data:`MAX_NAME_BYTES` bytes; else its first bytes (without leading dots and
    dashes, separators as ``_``) and 8 hex digits of its SHA-256, so distinct names stay apart and the same name
    always gets the same folder.

    Example::

        >>> folder_name("joint"), folder_name("."), folder_name(".."), folder_name(".hidden")
        ('joint', 'config-cdb4ee2a', 'config-5ec1f7e7', 'hidden-16924190')
        >>> len(folder_name("x" * 300).encode())
        69
    """
    if is_folder_name(name) and not name.startswith(".") and len(_bytes(name)) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(_bytes(name)).hexdigest()[:8]
    prefix = name
    for separator in _SEPARATORS:
        prefix = prefix.replace(separator, "_")
    prefix = _bytes(prefix.lstrip(".- "))[:_PREFIX_BYTES].decode("utf-8", "ignore")  # cut at a whole character
    return f"{prefix or 'config'}-{digest}"


def schedule_names(configs: Sequence[Union[str, os.PathLike]]) -> list[str]:
    """The run folder name of each config: its file name without the suffix, whatever the other configs are.

    Only configs whose file names collide are told apart, by their folder's name (``a-x``, ``b-x``), or where that
    does not tell them apart (or is another config's own file name), by a hash of their path; a name still taken
    (the same config given twice) gets ``_2``, ``_3``. The names do not depend on the configs' order. Each is one
    folder name of at most about :data:`MAX_NAME_BYTES` bytes (:func:`folder_name`).

    Example::

        >>> schedule_names(["a/x.yaml", "b/x.yaml", "c/x_2.yaml", "s_joint.yaml"])
        ['a-x', 'b-x', 'x_2', 's_joint']
        >>> schedule_names(["..yaml", "seed_0.yaml"])
        ['config-cdb4ee2a', 'seed_0']
    """
    paths = [Path(c).resolve() for c in configs]
    paths = [Path(_decoded(str(p))) for p in paths]  # a name that is not UTF-8 gets a folder Lightning can log to
    stems = Counter(p.stem for p in paths)
    own = {folder_name(p.stem) for p in paths if stems[p.stem] == 1}  # configs' run folders named by file alone

    def wanted(path: Path) -> str:
        if stems[path.stem] == 1:
            return folder_name(path.stem)
        folders = {folder_name(f"{p.parent.name}-{p.stem}") for p in paths if p.stem == path.stem}
        if len(folders) == stems[path.stem] and not folders & own:
            return folder_name(f"{path.parent.name}-{path.stem}")
        return folder_name(f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}")

    names = [wanted(p) for p in paths]
    out: dict[int, str] = {}
    for i in sorted(range(len(paths)), key=lambda i: str(paths[i])):  # suffixes by path, not by the order given
        unique, k = names[i], 1
        while unique in out.values() or (unique != names[i] and unique in names):
            k += 1
            unique = folder_name(f"{names[i]}_{k}")  # a name near the limit: shortened, not past it
        out[i] = unique
    return [out[i] for i in range(len(paths))]
