"""The ``lightning-stages`` command line: ``validate``, ``show`` and ``compare`` stage schedules.

``validate`` and ``show`` read a config without training: the seed's JSON format (root ``stage_schedule``,
``train``, ``distillation``) or a ``LightningCLI`` YAML whose ``trainer.callbacks`` hold a
:class:`~lightning_stages.StageScheduleCallback`. ``compare`` trains each ``LightningCLI`` config with the same
seeds, and writes a report that answers which schedule is better, where the seeds allow an answer.

The work is done in :mod:`~lightning_stages.cli.lightning_config` (reading configs and binding their schedule with
:func:`~lightning_stages.schedule.bind_schedule`, as ``fit`` would), :mod:`~lightning_stages.schedule.render` and
:mod:`~lightning_stages.cli.plots` (what ``show`` prints and draws), :mod:`~lightning_stages.cli.compare` and
:mod:`~lightning_stages.cli.compare_report`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from lightning_stages.cli.checkpoint_transitions import callback_state, format_checkpoint
from lightning_stages.cli.compare import OutputInUseError, run_compare
from lightning_stages.cli.declared_weights import DeclaredWeightsWarning
from lightning_stages.cli.launchers import RayConnectError
from lightning_stages.cli.lightning_config import (
    add_working_directory_to_path,
    schedule_of_config,
)
from lightning_stages.cli.plots import plot_timeline
from lightning_stages.errors import StageConfigError, printable, stage_label
from lightning_stages.schedule import StageSchedule
from lightning_stages.schedule.render import format_summary, format_table

__all__ = ["main"]

_NO_IMPORT_HELP = ("import no module named by a class_path (by default they are imported, the working directory "
                   "first on sys.path, and their top-level code runs); for untrusted configs: checks only what can be "
                   "checked without running code")
_NO_IMPORT_NOTE = ("note: --no-import: no class_path was imported; the model's __init__ defaults and callback "
                   "subclasses were not checked")


def _error_text(path: str, err: StageConfigError) -> str:
    """The error as printed: one line for a problem of the file itself (it names the file), else every problem."""
    if len(err.problems) == 1:
        problem = err.problems[0]
        if problem.index is None and problem.name is None and problem.field is None:
            message = printable(problem.message, 2000)  # it may quote the file (a parser's error): escaped, short
            return message if path in problem.message else f"{printable(path, 2000)}: {message}"
    return f"{path}: {err}"


def _plot_path(plot: str) -> tuple[Optional[Path], Optional[str]]:
    """The PNG ``--plot`` writes (``.png`` added to a name without suffix), or why it cannot be written."""
    path = Path(plot)
    if not plot or not path.name or path.name == "..":  # "", ".", "/", "..": no file name to write
        return None, f"--plot: {printable(plot)!r} names no file; give a path ending in .png"
    if path.suffix == "":
        return path.with_name(path.name + ".png"), None
    if path.suffix.lower() != ".png":
        return None, f"--plot writes a PNG: give a path ending in .png, not {printable(plot)!r}"
    if path.is_dir():
        return None, f"--plot: {printable(plot)!r} is a directory; give a path ending in .png"
    return path, None


_MODEL_HELP = ("the model class of a LightningCLI(MyModel, MyData) config, whose `model` section has no class_path, "
               "e.g. my_project.models.MyModel")


def _read(path: str, args: argparse.Namespace) -> StageSchedule:
    """``schedule_of_config`` of ``path``; what could not be read statically is printed as a note."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeclaredWeightsWarning)
            schedule = schedule_of_config(path, args.max_epochs, args.stages, model_class=args.model,
                                          import_modules=not args.no_import)
        total = schedule.total_steps if schedule.unit == "step" else schedule.total_epochs
        for index, name, end in schedule.cut_short(total) if total is not None else ():  # as fit warns
            print(f"note: {path}: {stage_label(index, name)} ends at {schedule.unit} {end} but the run stops at "
                  f"{total}; fit cuts it short", file=sys.stderr)
        return schedule
    finally:  # the note also goes with the problems of a config that fails; other warnings go on as they were
        for warning in caught:
            if issubclass(warning.category, DeclaredWeightsWarning):
                print(f"note: {path}: {printable(str(warning.message), 2000)}", file=sys.stderr)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-stages",
        description="Check, show and compare stage schedules of lightning-stages.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check configs without training (exit 0: OK, exit 2: errors)")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="seed-format JSON/YAML or LightningCLI YAML")
    p.add_argument("--max-epochs", type=int, default=None, help="check against this many epochs")
    p.add_argument("--stages", default=None, help="a seed-format schedule used with a LightningCLI config")
    p.add_argument("--model", default=None, metavar="CLASS_PATH", help=_MODEL_HELP)
    p.add_argument("--no-import", action="store_true", help=_NO_IMPORT_HELP)
    p = sub.add_parser("show", help="print the resolved schedule as a table, optionally draw a timeline PNG")
    p.add_argument("config", metavar="CONFIG", nargs="?", help="a config (not with --checkpoint)")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="print the transitions a run actually took, from its Lightning checkpoint")
    p.add_argument("--max-epochs", type=int, default=None, help="resolve against this many epochs")
    p.add_argument("--stages", default=None, help="a seed-format schedule used with a LightningCLI config")
    p.add_argument("--model", default=None, metavar="CLASS_PATH", help=_MODEL_HELP)
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the timeline into this PNG (needs matplotlib)")
    p.add_argument("--no-import", action="store_true", help=_NO_IMPORT_HELP)
    p = sub.add_parser("compare", help="train each LightningCLI config over the same seeds and write a report")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="LightningCLI YAML configs, one per schedule")
    p.add_argument("--seeds", default="3", metavar="N|auto",
                   help="number of seeds (0..N-1), default 3; 'auto': add seeds until the primary verdict is decided")
    p.add_argument("--max-seeds", type=int, default=None, help="the most seeds of --seeds auto (default 10)")
    p.add_argument("--out", default="runs/compare", help="output directory (report.md, curves.png, runs/)")
    p.add_argument("--metrics", nargs="+", default=["test/iou", "test/dice", "test/acc"],
                   help="test metrics of the table; the first decides the verdict")
    p.add_argument("--curve-metric", default="val/iou", help="validation metric drawn per epoch")
    p.add_argument("--jobs", type=int, default=None,
                   help="training runs at once, each in its own process (default: one per 2 cores)")
    p.add_argument("--fresh", action="store_true", help="train every run again, ignoring finished runs in --out")
    p.add_argument("--launcher", choices=["local", "ray"], default="local",
                   help="local processes, or each run as a Ray task (RAY_ADDRESS, else a local Ray)")
    p.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs per run with --launcher ray (default 1)")
    p.add_argument("--ray-num-gpus", type=float, default=0.0, help="GPUs per run with --launcher ray (default 0)")
    return parser


def _validate(args: argparse.Namespace) -> int:
    code = 0
    for path in args.configs:
        try:
            schedule = _read(path, args)
        except StageConfigError as err:
            print(_error_text(path, err), file=sys.stderr)
            code = 2
        else:
            print(f"OK {path}: {format_summary(schedule)}")
    if args.no_import:
        print(_NO_IMPORT_NOTE, file=sys.stderr)
    return code


def _show(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.checkpoint is None):
        print("show: give either a CONFIG or --checkpoint CKPT", file=sys.stderr)
        return 2
    if args.checkpoint is not None:
        try:
            text = format_checkpoint(callback_state(args.checkpoint))
        except StageConfigError as err:
            print(_error_text(args.checkpoint, err), file=sys.stderr)
            return 2
        print(f"{args.checkpoint}: {text}")
        return 0
    png, refused = _plot_path(args.plot) if args.plot is not None else (None, None)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    try:
        schedule = _read(args.config, args)
    except StageConfigError as err:
        print(_error_text(args.config, err), file=sys.stderr)
        return 2
    print(f"{args.config}: {format_summary(schedule)}")
    print(format_table(schedule))
    if args.no_import:
        print(_NO_IMPORT_NOTE, file=sys.stderr)
    if png is not None:
        try:
            with warnings.catch_warnings():  # numpy's overflow warnings come with the error below
                warnings.simplefilter("ignore", RuntimeWarning)
                png = plot_timeline(schedule, png)
        except ImportError as err:
            print(str(err), file=sys.stderr)
            return 1
        except OSError as err:
            print(f"--plot: cannot write {printable(str(png))!r}: {err.strerror or err}", file=sys.stderr)
            return 2
        except (ValueError, ArithmeticError) as err:  # values matplotlib cannot draw (e.g. weights near 1.7e308)
            print(f"--plot: cannot draw the timeline of {printable(args.config)!r}: {printable(err)}", file=sys.stderr)
            return 2
        added = " (.png added)" if png.name != Path(args.plot).name else ""
        print(f"timeline written to {png}{added}")
    return 0


def _compare_options(args: argparse.Namespace) -> list[str]:
    problems = []
    seeds = args.seeds
    if seeds != "auto" and not (re.fullmatch("[0-9]{1,9}", seeds) and int(seeds) >= 1):  # ASCII digits only
        problems.append(f"--seeds must be a positive number of seeds or 'auto', got {seeds!r}")
    if args.max_seeds is not None and seeds != "auto":
        problems.append(f"--max-seeds {args.max_seeds} goes with --seeds auto, not --seeds {seeds}")
    if args.max_seeds is not None and args.max_seeds < 2:
        problems.append(f"--max-seeds must be at least 2, got {args.max_seeds}")
    if args.jobs is not None and args.jobs < 1:
        problems.append(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs is not None and args.launcher == "ray":
        problems.append("--jobs is for the local launcher; with --launcher ray, --ray-num-cpus per run decides how "
                        "many runs share a machine")
    if not (0 < args.ray_num_cpus < math.inf and 0 <= args.ray_num_gpus < math.inf):  # NaN fails both
        problems.append(f"--ray-num-cpus must be > 0 and --ray-num-gpus >= 0, got {args.ray_num_cpus:g} and "
                        f"{args.ray_num_gpus:g}")
    problems += [f"no such config: {path}" for path in args.configs if not Path(path).is_file()]
    out = Path(args.out)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        problems.append(f"--out {printable(args.out)!r} cannot be a directory: {printable(str(blocking))!r} is a file")
    return problems


def _compare(args: argparse.Namespace) -> int:
    problems = _compare_options(args)
    if problems:
        print("\n".join(f"compare: {p}" for p in problems), file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *a, **k: print(f"warning: {printable(str(message), 2000)}",
                                                                  file=sys.stderr)
            result = run_compare(args.configs, seeds=args.seeds if args.seeds == "auto" else int(args.seeds),
                                 out=args.out, metrics=args.metrics, curve_metric=args.curve_metric,
                                 echo=lambda line: print(line, flush=True), max_seeds=args.max_seeds or 10,
                                 jobs=args.jobs, launcher=args.launcher, ray_num_cpus=args.ray_num_cpus,
                                 ray_num_gpus=args.ray_num_gpus, fresh=args.fresh)
    except ImportError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 1
    except StageConfigError as err:  # a config that cannot be read (not YAML, not a mapping): nothing trained
        print("compare: " + "; ".join(printable(problem.message, 2000) for problem in err.problems), file=sys.stderr)
        return 2
    except (OutputInUseError, RayConnectError) as err:
        print(f"compare: {printable(str(err), 2000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"compare: interrupted; the finished runs are kept in {args.out} (the same command trains the rest)",
              file=sys.stderr)
        return 130
    except SystemExit as err:  # Lightning's SIGTERMException, from a run of --jobs 1: the process was told to stop
        if type(err).__name__ != "SIGTERMException":
            raise
        print(f"compare: terminated (SIGTERM); the finished runs are kept in {args.out} (the same command trains the "
              "rest)", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports a process it ended
    print("\n".join(result.locations()))
    return 1 if result.failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lightning-stages`` console script; returns the exit code.

    Example::

        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.json"
        >>> _ = p.write_text('{"stage_schedule": [{"start_epoch": 0, "lambda_coef": -1}]}')
        >>> main(["validate", str(p)])
        2
    """
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if not getattr(args, "no_import", False):
        add_working_directory_to_path()
    command = {"validate": _validate, "show": _show, "compare": _compare}[args.command]
    return command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
