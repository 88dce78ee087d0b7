"""Whether the configs of a ``compare`` differ in more than their schedules (:func:`like_for_like_differences`).

A nested config file that a setting names (``model: model.yaml``, as LightningCLI reads it) counts by its content,
not by its name: two configs naming files of one name with different content differ, and a file named by one config
and written out in the other does not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from lightning_stages.cli.lightning_config import _SCHEDULE_MODEL_KEYS, _fit_section, _max_epochs_of, _section
from lightning_stages.cli.nested_files import nested_file
from lightning_stages.errors import StageConfigError, printable
from lightning_stages.schedule.config_input import MAX_DEPTH
from lightning_stages.schedule.seed_format import load_config

__all__ = ["like_for_like_differences"]

#: the Trainer's settings that do not change what a run trains (where it writes, what it shows), and its callbacks
#: (where the schedule is)
_NOT_TRAINING = frozenset({"callbacks", "logger", "default_root_dir", "enable_progress_bar", "enable_model_summary",
                           "enable_checkpointing", "log_every_n_steps", "profiler"})

#: the most nested file contents one config may expand to, in values (files named many times count each time)
_MAX_EXPANDED = 10_000


def _expanded(value: Any, folder: Path, open_files: tuple[Path, ...] = (), read: Optional[_Read] = None) -> Any:
    """``value`` with every string that names a nested config file replaced by that file's content (expanded in
    turn, relative to its own folder); a file that cannot be read, that names itself, or beyond :data:`_MAX_EXPANDED`
    values in all (files that each name the next twice would double at every level) stays a name."""
    read = _Read() if read is None else read
    if len(open_files) > MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {key: _expanded(item, folder, open_files, read) for key, item in value.items()}
    if isinstance(value, list):
        return [_expanded(item, folder, open_files, read) for item in value]
    nested = read.named(value, folder)
    if nested is None or nested in open_files:
        return value
    content = read.content(nested)
    if content is None:
        return value
    return _expanded(content, nested.parent, (*open_files, nested), read)


class _Read:
    """The nested files of one config, each read once, and how many values their contents may still add."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[Any, int]] = {}  # each file's content and its size in values
        self.names: dict[tuple[str, Path], Optional[Path]] = {}  # what each string names, from each folder
        self.left = _MAX_EXPANDED

    def named(self, value: Any, folder: Path) -> Optional[Path]:
        """:func:`~lightning_stages.cli.nested_files.nested_file`, looked up once per string and folder."""
        if not isinstance(value, str):
            return None
        if (value, folder) not in self.names:
            self.names[(value, folder)] = nested_file(value, folder)
        return self.names[(value, folder)]

    def content(self, path: Path) -> Any:
        """``path``'s content, or ``None`` when it cannot be read (compare names the file when it runs the config)
        or would add more values than are left."""
        if path not in self.files:
            try:
                content: Any = load_config(path)
            except StageConfigError:
                content = None
            self.files[path] = (content, _size(content))
        content, size = self.files[path]
        if content is None or size > self.left:
            return None
        self.left -= size
        return content


def _size(value: Any) -> int:
    """How many values ``value`` holds, itself included."""
    if isinstance(value, Mapping):
        return 1 + sum(_size(item) for item in value.values())
    if isinstance(value, list):
        return 1 + sum(_size(item) for item in value)
    return 1


def _settings(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The settings that must be equal for a like-for-like comparison, flattened to ``{"data.init_args.x": value}``."""
    folder = Path(path).resolve().parent
    data = _fit_section(load_config(path))
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        else:
            flat[prefix] = value

    walk("data", _expanded(data.get("data"), folder))
    expanded = _expanded(data.get("model"), folder)
    model = {k: v for k, v in (expanded if isinstance(expanded, Mapping) else {}).items()
             if k not in _SCHEDULE_MODEL_KEYS}
    if expanded is not None and not isinstance(expanded, Mapping):
        model["class_path"] = expanded  # a bare class path (``model: my.Net``)
    model["init_args"] = {k: v for k, v in _section(model, "init_args").items() if k not in _SCHEDULE_MODEL_KEYS}
    walk("model", model)
    trainer = _expanded(data.get("trainer"), folder)
    trainer = trainer if isinstance(trainer, Mapping) else {}
    walk("trainer", {k: v for k, v in trainer.items() if k not in _NOT_TRAINING})
    for key in ("max_epochs", "max_steps"):  # as the parser reads them ("9" is 9; -1 and none are no limit)
        flat[f"trainer.{key}"] = _max_epochs_of({"trainer": trainer}, key)
    for key in ("optimizer", "lr_scheduler"):  # LightningCLI's own sections
        walk(key, _expanded(data.get(key), folder))
    return flat


def _name(path: Union[str, os.PathLike]) -> str:
    """A config's file name as the terminal and the report show it (bytes that are not UTF-8 as ``\\xe9``)."""
    return printable(Path(path).name, limit=4096)


def like_for_like_differences(configs: Sequence[Union[str, os.PathLike]]) -> list[str]:
    """Data, model, Trainer or optimizer settings in which the configs differ from the first (the schedule aside).

    Everything under ``data`` and ``model`` counts, except the model's schedule settings (``loss_weights``,
    ``use_distillation``, ``lambda_coef``); so does everything under ``trainer`` except its callbacks, logger and
    output options, and LightningCLI's ``optimizer`` and ``lr_scheduler``. A nested config file counts by its
    content (see the module's description).

    Example::

        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.yaml").write_text("data: {init_args: {num_train: 64}}\\nmodel: {init_args: {lambda_coef: 1}}")
        >>> _ = (d / "b.yaml").write_text("data: {init_args: {num_train: 32}}\\nmodel: {init_args: {lambda_coef: 2}}")
        >>> like_for_like_differences([d / "a.yaml", d / "b.yaml"])
        ['b.yaml: data.init_args.num_train = 32, but 64 in a.yaml']
    """
    out: list[str] = []
    if len(configs) < 2:
        return out
    first, first_name = _settings(configs[0]), _name(configs[0])
    for path in configs[1:]:
        other = _settings(path)
        out += [printable(f"{_name(path)}: {key} = {other.get(key)!r}, but {first.get(key)!r} in {first_name}",
                          limit=4096)
                for key in sorted(set(first) | set(other)) if first.get(key) != other.get(key)]
    return out
