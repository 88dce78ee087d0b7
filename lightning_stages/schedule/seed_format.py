"""Reading JSON (with ``//`` comments) and YAML config files with errors that name the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import yaml

from lightning_stages.errors import StageConfigError, StageProblem

__all__ = ["load_config", "strip_json_comments"]

PathLike = Union[str, "os.PathLike[str]"]


def strip_json_comments(text: str) -> str:
    """Remove ``//`` and ``/* */`` comments outside strings, keeping line numbers unchanged.

    The seed's examples are written as JSONC; this lets them be used verbatim.

    Example::

        >>> strip_json_comments('{"a": 1, // one\\n "b": "x//y"}')
        '{"a": 1, \\n "b": "x//y"}'
    """
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
        elif ch == '"':
            in_string = True
            out.append(ch)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end == -1 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            block = text[i : n if end == -1 else end + 2]
            out.append("\n" * block.count("\n"))
            i = n if end == -1 else end + 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def load_config(path: PathLike) -> dict[str, Any]:
    """Load a JSON or YAML config file into a mapping.

    ``.json`` files may hold ``//`` and ``/* */`` comments. Any other suffix is read as YAML.

    Raises:
        StageConfigError: the file is missing, unreadable, not valid JSON/YAML (the message gives
            file and line), or its root is not a mapping.

    Example::

        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
        >>> _ = p.write_text('{"stage_schedule": [] // none yet\\n}')
        >>> load_config(p)
        {'stage_schedule': []}
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise StageConfigError(StageProblem(f"cannot read config file {str(path)!r}: {err.strerror or err}")) from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(strip_json_comments(text))
        except json.JSONDecodeError as err:
            raise StageConfigError(
                StageProblem(f"{path}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}")
            ) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            reason = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise StageConfigError(StageProblem(f"{where}: not valid YAML: {reason}")) from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise StageConfigError(
            StageProblem(f"{path}: the root of a config must be a mapping, not {type(data).__name__}")
        )
    return dict(data)
