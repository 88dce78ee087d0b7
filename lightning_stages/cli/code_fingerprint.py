"""The source files of your own classes that a ``compare`` run's config names, for the run's fingerprint.

A config names its model, data module and callbacks by ``class_path``. Where such a class is defined in a module of
the working directory (your project, not an installed package), that module's source file is part of what the run
depends on: editing the model's code makes the finished runs of that config stale, as editing the config does.
Only the module that defines the class counts, not the modules it imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["source_digests"]

_INSTALLED = ("site-packages", "dist-packages")


def _class_paths(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "class_path" and isinstance(item, str):
                yield item
            else:
                yield from _class_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _class_paths(item)


def _project_source(module: str, project: Path) -> Path | None:
    """The source file of ``module`` if it lies in ``project`` (and not in an installed package there, a venv)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError, AttributeError):  # a parent that cannot be imported: the run reports it
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    path = Path(spec.origin).resolve()
    if not path.is_relative_to(project) or any(part in _INSTALLED for part in path.parts):
        return None
    return path


def source_digests(configs: Iterable[Any]) -> dict[str, str]:
    """``{module: sha256 of its source}`` of each module in the working directory that a ``class_path`` names.

    Example::

        >>> import os, tempfile, pathlib
        >>> here = os.getcwd()
        >>> os.chdir(tempfile.mkdtemp())
        >>> _ = pathlib.Path("my_model_module.py").write_text("class Net: pass")
        >>> import sys; sys.path.insert(0, os.getcwd())
        >>> list(source_digests([{"model": {"class_path": "my_model_module.Net"}},
        ...                      {"trainer": {"callbacks": [{"class_path": "lightning_stages.StageScheduleCallback"}]}}]))
        ['my_model_module']
        >>> _ = sys.path.pop(0); os.chdir(here)
    """
    project = Path.cwd().resolve()
    found: dict[str, str] = {}
    for config in configs:
        for class_path in _class_paths(config):
            module = class_path.rpartition(".")[0]
            if not module or module in found:
                continue
            source = _project_source(module, project)
            if source is not None:
                with contextlib.suppress(OSError):
                    found[module] = hashlib.sha256(source.read_bytes()).hexdigest()
    return found
