"""The ``LightningCLI`` of lightning-stages: a ``--stages`` option, and stage schedules checked before parsing.

:class:`StagesLightningCLI` is the ``LightningCLI`` the ``compare`` command and the examples use; it adds
``--stages path.json`` (train with a schedule in the seed's format) and checks every stage schedule of its config
files before parsing, so a bad schedule fails with the library's :class:`~lightning_stages.StageConfigError` rather
than a parser message.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from lightning_stages.cli.lightning_config import (
    check_lightning_config,
    more_schedules_problem,
    two_schedules_problem,
)
from lightning_stages.cli.nested_files import with_nested_trainer
from lightning_stages.errors import StageConfigError
from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.config_input import parse_yaml
from lightning_stages.schedule.seed_format import load_config
from lightning_stages.stage_schedule_callback import StageScheduleCallback

__all__ = ["StagesLightningCLI"]


_SCHEDULE_OPTIONS = ("--trainer.callbacks.stage_schedule", "--trainer.callbacks.init_args.stage_schedule")
_CONFIG_OPTIONS = ("--trainer.callbacks.config", "--trainer.callbacks.init_args.config")  # a seed-format file
_CALLBACKS_OPTIONS = ("--trainer.callbacks", "--trainer.callbacks+")  # whole callbacks: a list, or one to add


def _option_values(args: Sequence[str], options: Sequence[str]) -> list[tuple[str, str]]:
    """``(option, value)`` of every one of ``options`` on a command line, as ``--option value`` or
    ``--option=value``, in order."""
    found: list[tuple[str, str]] = []
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if option in options:
            if equals:
                found.append((option, value))
            elif i + 1 < len(args):
                found.append((option, args[i + 1]))
    return found


def _check_command_line_schedule(option: str, value: str) -> None:
    """Check a stage schedule given on the command line to the last callback (jsonargparse's
    ``--trainer.callbacks.stage_schedule=...``, after ``--trainer.callbacks+=...StageScheduleCallback``) as the parser
    would read it (YAML), so that a bad one fails with the library's error; a value that is no list (a path, say) is
    left to the parser."""
    schedule = parse_yaml(value, source=option)
    if isinstance(schedule, list):
        check_lightning_config({"trainer": {"callbacks": [
            {"class_path": "lightning_stages.StageScheduleCallback", "init_args": {"stage_schedule": schedule}}]}})


def _check_command_line_callbacks(option: str, value: str) -> None:
    """Check the stage schedules of callbacks given whole on the command line (``--trainer.callbacks=[...]``,
    ``--trainer.callbacks+={class_path: ..., init_args: ...}``) as the parser would read them (YAML); a value that is
    neither a list nor a mapping (a class name, a file) is left to the parser."""
    callbacks = parse_yaml(value, source=option)
    if isinstance(callbacks, (list, Mapping)):
        check_lightning_config({"trainer": {"callbacks": callbacks}})


class StagesLightningCLI(LightningCLI):
    """``LightningCLI`` with a ``--stages path.json`` option and stage schedules checked before parsing.

    * ``--stages path``: train with a schedule in the seed's JSON format (``stage_schedule``,
      ``train.loss_weights``, ``distillation``); it adds ``StageScheduleCallback(config=path)`` to the Trainer.
    * Before parsing, the schedule of every ``--config`` file's ``StageScheduleCallback``, of every ``--stages``
      file, of every ``--trainer.callbacks.config=...`` file and of every ``--trainer.callbacks.stage_schedule=...`` is checked (without building a callback), so a bad schedule fails with :class:`~lightning_stages.StageConfigError` naming stage, field and value (the
      parser alone would only say that ``trainer.callbacks`` does not validate).

    Takes ``LightningCLI``'s arguments; ``model_class`` and ``datamodule_class`` default to ``None`` (any
    class given by ``class_path`` in the config).

    Example::

        >>> import tempfile, pathlib
        >>> cfg = pathlib.Path(tempfile.mkdtemp()) / "bad.yaml"
        >>> _ = cfg.write_text("trainer:\\n  callbacks:\\n  - class_path: lightning_stages.StageScheduleCallback\\n"
        ...                    "    init_args: {stage_schedule: [{start_epoch: 0, lambda_coef: -1}]}\\n")
        >>> try:
        ...     StagesLightningCLI(args=["fit", "--config", str(cfg)])
        ... except StageConfigError as err:
        ...     print(err.problems[0])
        stage 0: `lambda_coef` = -1: must be >= 0
    """

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--stages", type=Optional[str], default=None,
            help="Train with a stage schedule in the seed's JSON format (stage_schedule, train.loss_weights, "
                 "distillation); adds StageScheduleCallback(config=STAGES) to the trainer.",
        )

    @override
    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None or isinstance(args, (list, tuple)):
            given = list(sys.argv[1:] if args is None else args)
            for _, path in _option_values(given, ("--config", "-c")):
                if Path(path).is_file():
                    # a schedule here and `--stages` is an error only if a later config does not replace it: the
                    # Trainer's callbacks after parsing tell (instantiate_trainer)
                    data = with_nested_trainer(load_config(path), Path(path).parent)
                    check_lightning_config(data)
                    fit: Mapping[str, Any] = data["fit"] if isinstance(data.get("fit"), Mapping) else data
                    if isinstance(fit.get("stages"), str):  # the `--stages` option, set in the file
                        StageSchedule.from_config(fit["stages"])
            for _, path in _option_values(given, ("--stages", *_CONFIG_OPTIONS)):
                StageSchedule.from_config(path)
            for option, value in _option_values(given, _SCHEDULE_OPTIONS):
                _check_command_line_schedule(option, value)
            for option, value in _option_values(given, _CALLBACKS_OPTIONS):
                _check_command_line_callbacks(option, value)
        with warnings.catch_warnings():
            # giving `args` from Python (compare, tests) is what we mean to do; LightningCLI warns about it anyway
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            super().parse_arguments(parser, args)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        stages = self._get(self.config_init, "stages")
        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        schedules = sum(isinstance(cb, StageScheduleCallback) for cb in callbacks)
        if stages:
            if schedules:
                raise StageConfigError(two_schedules_problem(stages))
            kwargs["callbacks"] = [*callbacks, StageScheduleCallback(config=stages)]
        elif schedules > 1:  # e.g. one added with --trainer.callbacks+=; else Lightning's stateful-callback error
            raise StageConfigError(more_schedules_problem(schedules))
        return super().instantiate_trainer(**kwargs)
