"""The seed's config format: reading JSON (with comments) and YAML files, its sections, and writing it back.

A config's root holds ``stage_schedule``, ``train`` (``loss_weights``, ``epochs``) and ``distillation``
(``enable``, ``lambda_coef``); any other root key (dataset, model, ...) is not the schedule's and is ignored.
Every error names the file, line and column.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from lightning_stages.errors import StageConfigError, StageProblem
from lightning_stages.schedule.checks import near_miss_problems
from lightning_stages.schedule.config_input import check_shape, parse_json, parse_yaml, read_text
from lightning_stages.schedule.stage import STAGE_FIELDS, plain

if TYPE_CHECKING:
    from lightning_stages.schedule.stage_schedule import StageSchedule

__all__ = ["config_path_problems", "diff", "load_config", "parse_json", "schedule_arguments", "to_dict"]

# root keys of the seed's config format that the schedule reads; everything else (dataset, model, ...) is ignored
ROOT_KEYS = ("stage_schedule", "train", "distillation")
TRAIN_KEYS = ("loss_weights", "epochs", "max_steps")
DISTILLATION_KEYS = ("enable", "lambda_coef")
# root keys of a LightningCLI config that reading one looks into
_LIGHTNING_KEYS = ("trainer", "model", "data", "fit")

PathLike = Union[str, "os.PathLike[str]"]


def load_config(path: PathLike) -> dict[str, Any]:
    """Load a JSON or YAML config file into a mapping.

    ``.json`` files may hold ``//`` and ``/* */`` comments (read by :func:`parse_json`). Any other suffix is read
    as YAML. Hostile input is refused (:mod:`.config_input`): a key given twice, a binary file, a number too long to
    read, nesting deeper than 100 levels, YAML aliases that expand too far.

    Raises:
        StageConfigError: the file is missing, unreadable, not valid JSON/YAML (the message gives
            file and line), hostile as above, or its root is not a mapping.

    Example::

        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
        >>> _ = p.write_text('{"stage_schedule": [] // none yet\\n}')
        >>> load_config(p)
        {'stage_schedule': []}
    """
    if not os.fspath(path):  # Path("") would read as "." and be named so
        raise StageConfigError(StageProblem("cannot read config file '': the path is empty"))
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() == ".json":
        data = parse_json(text, str(path))
        if isinstance(data, Mapping):  # what is read of it (the rest is left to json's own limits: it stays fast)
            check_shape({key: data[key] for key in (*ROOT_KEYS, *_LIGHTNING_KEYS) if key in data}, str(path))
    else:
        data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise StageConfigError(
            StageProblem(f"{path}: the root of a config must be a mapping, not {type(data).__name__}")
        )
    return dict(data)


def config_path_problems(value: Any, *, name: Optional[str] = None, what: str = "") -> list[StageProblem]:
    """A config file must be named by a path: a ``str`` or an ``os.PathLike`` giving one (``what``: the other kinds of
    value also accepted, for the message).

    Example::

        >>> print(config_path_problems(123, name="StageScheduleCallback")[0])
        StageScheduleCallback: `config` = 123: must be the path of a JSON or YAML config file, not int
    """
    if isinstance(value, str) or (isinstance(value, os.PathLike) and isinstance(os.fspath(value), str)):
        return []
    return [StageProblem(f"must be the path of a JSON or YAML config file{what}, not {type(value).__name__}",
                         name=name, field="config", value=value)]


def schedule_arguments(source: Union[PathLike, Mapping[str, Any]]) -> dict[str, Any]:
    """The arguments of :class:`~lightning_stages.StageSchedule` a config in the seed's format gives.

    A misspelt ``stage_schedule`` is an error (it would silently train single-stage); near-misses of the base keys
    may be keys of an older config (``training``, ``distillation.lambda``) that must keep working: a warning.

    Raises:
        StageConfigError: ``source`` is neither a path nor a mapping, the file cannot be read or parsed, a section is
            not a mapping, or ``stage_schedule`` is misspelt.

    Example::

        >>> schedule_arguments({"train": {"epochs": 4}, "stage_schedule": [{"start_epoch": 0}]})
        {'stages': [{'start_epoch': 0}], 'loss_weights': None, 'distillation': None, 'lambda_coef': None, 'total_epochs': 4}
    """
    if not isinstance(source, Mapping) and (not_a_path := config_path_problems(source, what=" or a mapping")):
        raise StageConfigError(not_a_path)
    data = load_config(source) if not isinstance(source, Mapping) else source
    problems: list[StageProblem] = []

    def section(key: str) -> Mapping[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            problems.append(StageProblem(f"must be a mapping, not {type(value).__name__}", name="config",
                                         field=key, value=value))
            return {}
        return value

    root = near_miss_problems(data, ROOT_KEYS, "")
    problems += [p for p in root if p.hint == "did you mean `stage_schedule`?"]
    train, distillation = section("train"), section("distillation")
    suspicious = [p for p in root if p not in problems]
    suspicious += near_miss_problems(train, TRAIN_KEYS, "train.")
    suspicious += near_miss_problems(distillation, DISTILLATION_KEYS, "distillation.")
    for problem in suspicious:
        warnings.warn(f"{problem} (ignored)", UserWarning, stacklevel=3)
    if problems:
        raise StageConfigError(problems)
    return {
        # only an absent (or null) `stage_schedule` means "no stages"; `{}` or `""` is a mistake the check names
        "stages": data.get("stage_schedule") if data.get("stage_schedule") is not None else (),
        "loss_weights": train.get("loss_weights"),
        "distillation": distillation.get("enable"),
        "lambda_coef": distillation.get("lambda_coef"),
        "total_epochs": train.get("epochs"),
        **({"total_steps": train["max_steps"]} if train.get("max_steps") is not None else {}),
    }


def to_dict(schedule: StageSchedule) -> dict[str, Any]:
    """``schedule`` in the seed's format (plain data, safe to put in a checkpoint); unset base settings left out.

    Example::

        >>> from lightning_stages.schedule.stage_schedule import StageSchedule
        >>> to_dict(StageSchedule([{"start_epoch": 0}], lambda_coef=2.0, total_epochs=3))
        {'stage_schedule': [{'start_epoch': 0}], 'train': {'epochs': 3}, 'distillation': {'lambda_coef': 2.0}}
    """
    out: dict[str, Any] = {"stage_schedule": [stage.to_dict() for stage in schedule.stages]}
    train: dict[str, Any] = {}
    if schedule.loss_weights is not None:
        train["loss_weights"] = dict(schedule.loss_weights)
    if schedule.total_epochs is not None:
        train["epochs"] = schedule.total_epochs
    if schedule.total_steps is not None:
        train["max_steps"] = schedule.total_steps
    distillation = {key: value for key, value in (("enable", schedule.distillation),
                                                    ("lambda_coef", schedule.lambda_coef)) if value is not None}
    if train:
        out["train"] = train
    if distillation:
        out["distillation"] = distillation
    return plain(out)  # what a checkpoint holds: loads with torch.load(weights_only=True)


def diff(before: StageSchedule, after: StageSchedule) -> list[str]:
    """Human-readable differences from ``before`` to ``after``, in the seed's field names; empty when alike.

    Example::

        >>> from lightning_stages.schedule.stage_schedule import StageSchedule
        >>> diff(StageSchedule(total_epochs=3), StageSchedule([{"start_epoch": 0}], total_epochs=4))
        ['total_epochs 3 -> 4', 'number of stages 0 -> 1']
    """
    changes: list[str] = []
    for label, mine, theirs in (
        ("base loss_weights", before.loss_weights, after.loss_weights),
        ("base distillation", before.distillation, after.distillation),
        ("base lambda_coef", before.lambda_coef, after.lambda_coef),
        ("total_epochs", before.total_epochs, after.total_epochs),
        ("total_steps", before.total_steps, after.total_steps),
    ):
        if mine != theirs:
            changes.append(f"{label} {mine!r} -> {theirs!r}")
    if len(before.stages) != len(after.stages):
        changes.append(f"number of stages {len(before.stages)} -> {len(after.stages)}")
    for index, (a, b) in enumerate(zip(before.stages, after.stages)):
        where = f"stage {index}" + (f" ({a.name!r})" if a.name is not None else "")
        da, db = a.to_dict(), b.to_dict()
        for key in STAGE_FIELDS:
            if da.get(key) != db.get(key):
                changes.append(f"{where}: {key} {da.get(key)!r} -> {db.get(key)!r}")
    return changes
