"""Config files that a LightningCLI config names as a setting's value (``model: model.yaml``, ``trainer:
trainer.yaml``), read from the config's folder as LightningCLI reads them:

* :func:`nested_file`: the file a setting's string names, if any;
* :func:`with_nested_trainer`: a config whose ``trainer`` or ``model`` section is such a file, with the file's content in
  its place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from lightning_stages.cli.run_fingerprint import _NESTED  # the suffixes of a nested config file, as fingerprinted
from lightning_stages.schedule.seed_format import load_config

__all__ = ["nested_file", "with_nested_trainer"]

_READ = ("trainer", "model")  # the sections a schedule's check reads


def nested_file(value: Any, folder: Path) -> Optional[Path]:
    """The config file a setting's string names, relative to the config's folder (where LightningCLI reads it, not
    the working directory); ``None`` if it names none."""
    if not isinstance(value, str) or not value.lower().endswith(_NESTED) or "\n" in value or len(value) > 4096:
        return None
    try:
        path = folder / value
        return path.resolve() if path.is_file() else None
    except (OSError, ValueError):  # a name the file system refuses (a NUL byte, too long)
        return None


def with_nested_trainer(data: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """``data`` (a LightningCLI config read from ``folder``) with a ``trainer`` or ``model`` section (or ``fit.trainer``,
    ``fit.model``) that names a config file replaced by that file's content, so that the StageScheduleCallback in it,
    and the model's class and declared weights, are checked.

    Raises:
        StageConfigError: the named file cannot be read as a config (naming it).
    """
    fit = data.get("fit")
    if isinstance(fit, Mapping):
        return {**data, "fit": with_nested_trainer(fit, folder)}
    nested = {key: load_config(path) for key in _READ if (path := nested_file(data.get(key), folder)) is not None}
    return {**data, **nested}
