"""What a LightningCLI config's ``trainer.callbacks`` may not hold beside a
:class:`~lightning_stages.StageScheduleCallback`, checked without training (``validate``, ``show``, ``compare``,
``StagesLightningCLI``):

* :func:`more_schedules_problem`: more than one schedule callback;
* :func:`two_schedules_problem`: a ``--stages`` file beside a config's own schedule callback;
* :func:`averaging_callbacks`: Lightning's ``WeightAveraging`` callbacks, which ``restore_best`` stages may not be
  beside (:func:`~lightning_stages.adaptive_stages.restore_best_problems`, as ``fit`` refuses them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Union

import lightning.pytorch as pl

from lightning_stages.cli.declared_weights import import_class_path
from lightning_stages.errors import StageProblem

__all__ = ["averaging_callbacks", "more_schedules_problem", "two_schedules_problem"]

# Lightning's own WeightAveraging classes, recognised by name when nothing may be imported (--no-import)
_AVERAGING_NAMES = ("WeightAveraging", "EMAWeightAveraging")


def more_schedules_problem(value: Any) -> StageProblem:
    """The problem of ``trainer.callbacks`` holding more than one ``StageScheduleCallback`` (``value``: their
    positions in a config, or their number after LightningCLI merged the configs and the command line).

    Example::

        >>> more_schedules_problem(2).field
        'trainer.callbacks'
    """
    return StageProblem("holds more than one StageScheduleCallback; give one schedule per run", name="config",
                        field="trainer.callbacks", value=value)


def two_schedules_problem(stages: Union[str, os.PathLike]) -> StageProblem:
    """The problem of a ``--stages`` file given with a config that already has a ``StageScheduleCallback``.

    Example::

        >>> two_schedules_problem("s.json").field
        'stages'
    """
    return StageProblem("the config already has a StageScheduleCallback in trainer.callbacks; give one schedule",
                        name="config", field="stages", value=os.fspath(stages))


def averaging_callbacks(callbacks: Any, import_modules: bool = True) -> list[str]:
    """The class names of the Lightning ``WeightAveraging`` callbacks (``EMAWeightAveraging``, subclasses) among a
    config's ``trainer.callbacks`` (``callbacks``: the section's value). Each class path is imported (a bare name is
    one of ``lightning.pytorch.callbacks``, as LightningCLI resolves it); with ``import_modules=False`` nothing is,
    and Lightning's own classes are recognised by name. Entries that are no class path are left to the other checks.

    Example::

        >>> averaging_callbacks([{"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging"}, "ModelCheckpoint"])
        ['EMAWeightAveraging']
    """
    kinds = getattr(pl.callbacks, "WeightAveraging", None)  # Lightning >= 2.6
    entries = [callbacks] if isinstance(callbacks, (Mapping, str)) else callbacks
    found = []
    for entry in entries if isinstance(entries, (list, tuple)) else ():
        path = entry.get("class_path") if isinstance(entry, Mapping) else entry
        if not isinstance(path, str):
            continue
        name = path.rpartition(".")[2]
        if not import_modules or kinds is None:
            found += [name] if kinds is not None and name in _AVERAGING_NAMES else []
            continue
        cls = getattr(pl.callbacks, path, None) if "." not in path else import_class_path(path, "class_path")[0]
        found += [cls.__name__] if isinstance(cls, type) and issubclass(cls, kinds) else []
    return found
