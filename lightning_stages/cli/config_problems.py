"""What a LightningCLI config's ``trainer.callbacks`` may not hold beside a
:class:`~lightning_stages.StageScheduleCallback`, checked without training (``validate``, ``show``, ``compare``,
``StagesLightningCLI``):

* :func:`more_schedules_problem`: more than one schedule callback;
* :func:`two_schedules_problem`: a ``--stages`` file beside a config's own schedule callback;
* :func:`averaging_callbacks`: Lightning's weight-averaging callbacks (EMA, SWA), which ``restore_best`` stages may
  not be beside (:func:`~lightning_stages.adaptive_stages.restore_best_problems`, as ``fit`` refuses them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Union

import lightning.pytorch as pl

from lightning_stages.adaptive_stages import AVERAGED_AT_THE_END, AVERAGED_VALIDATION, averaging_reason
from lightning_stages.cli.declared_weights import import_class_path
from lightning_stages.errors import StageProblem

__all__ = ["averaging_callbacks", "more_schedules_problem", "two_schedules_problem"]

# Lightning's own weight-averaging classes, recognised by name when nothing may be imported (--no-import)
_BY_NAME = {"WeightAveraging": AVERAGED_VALIDATION, "EMAWeightAveraging": AVERAGED_VALIDATION,
            "StochasticWeightAveraging": AVERAGED_AT_THE_END}


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


def averaging_callbacks(callbacks: Any, import_modules: bool = True) -> list[tuple[str, str]]:
    """``(class name, why restore_best cannot be beside it)`` of each weight-averaging callback (Lightning's
    ``WeightAveraging``, ``EMAWeightAveraging``, ``StochasticWeightAveraging``, subclasses) among a config's
    ``trainer.callbacks`` (``callbacks``: the section's value). Each class path is imported (a bare name is one of
    ``lightning.pytorch.callbacks``, as LightningCLI resolves it); with ``import_modules=False`` nothing is, and
    Lightning's own classes are recognised by name. Entries that are no class path are left to the other checks.

    Example::

        >>> swa = {"class_path": "lightning.pytorch.callbacks.StochasticWeightAveraging"}
        >>> [name for name, _ in averaging_callbacks([swa, "ModelCheckpoint"])]
        ['StochasticWeightAveraging']
    """
    entries = [callbacks] if isinstance(callbacks, (Mapping, str)) else callbacks
    found = []
    for entry in entries if isinstance(entries, (list, tuple)) else ():
        path = entry.get("class_path") if isinstance(entry, Mapping) else entry
        if not isinstance(path, str):
            continue
        if not import_modules:
            why = _BY_NAME.get(path.rpartition(".")[2])
            found += [(path.rpartition(".")[2], why)] if why is not None else []
            continue
        cls = getattr(pl.callbacks, path, None) if "." not in path else import_class_path(path, "class_path")[0]
        if isinstance(cls, type) and (why := averaging_reason(cls)) is not None:
            found.append((cls.__name__, why))
    return found
