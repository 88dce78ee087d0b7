"""``python -m examples.segmentation {fit,validate,test,predict} --config ...`` (LightningCLI), or ``demo``.

``demo`` answers the research question end to end, where distillation can matter: the student knows the labels of
only 10% of the training images (``labelled_fraction``), the teacher was trained on all of them. It trains the
teacher (unless its finished checkpoint exists), tests it for reference, then runs ``lightning-stages compare
--jobs 2`` over distill->finetune, finetune->distill, joint, and labels only (no distillation), and prints where the
report is.
``--labelled-fraction 1.0`` runs the same comparison with every label known.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import yaml

CONFIGS = Path("configs")
TEACHER_CONFIG = CONFIGS / "segmentation_teacher.yaml"
SCHEDULE_CONFIGS = [
    CONFIGS / "segmentation_distill_finetune.yaml",
    CONFIGS / "segmentation_finetune_distill.yaml",
    CONFIGS / "segmentation_joint.yaml",
    CONFIGS / "segmentation_labels_only.yaml",
]
#: the demo's budget: seeds per schedule and runs at once (each with its share of the cores)
DEMO_SEEDS = 4
DEMO_JOBS = 2
NOISE = (".*does not have many workers.*", ".*DiceScore metric currently defaults.*", ".*litlogger.*", ".*treespec.*",
         ".*smaller than the logging interval.*")


def _quiet_warnings() -> None:
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def unfinished_teacher(checkpoint: Path, config: Path = TEACHER_CONFIG) -> Optional[str]:
    """Why ``checkpoint`` is not the teacher ``config`` trains, or ``None`` when it is.

    The teacher config saves its checkpoint after every epoch, so an interrupted training leaves the checkpoint of
    its last finished epoch: one that has trained fewer than the config's ``max_epochs`` is not the teacher.
    """
    import torch

    wanted = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("max_epochs")
    epoch = torch.load(checkpoint, map_location="cpu", weights_only=True).get("epoch")
    if isinstance(wanted, int) and isinstance(epoch, int) and epoch + 1 < wanted:
        return f"it has trained {epoch + 1} of the {wanted} epochs of {config} (an interrupted training?)"
    return None


def with_labelled_fraction(configs: Sequence[Path], fraction: float, folder: Path) -> list[Path]:
    """Copies of ``configs`` in ``folder`` whose data module has ``labelled_fraction: fraction``; the same file names,
    so the schedules keep their names. Returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for config in configs:
        content = yaml.safe_load(config.read_text())
        content["data"]["init_args"]["labelled_fraction"] = fraction
        path = folder / config.name
        path.write_text(f"# {config} with labelled_fraction: {fraction} (python -m examples.segmentation demo)\n"
                        + yaml.safe_dump(content, sort_keys=False))
        written.append(path)
    return written


def demo(argv: Optional[list[str]] = None) -> int:
    """Teacher (if missing), then compare the schedules; prints where the report is. Returns the exit code."""
    from examples.segmentation.module import TEACHER_CHECKPOINT, SegmentationTeacher
    from lightning_stages.cli import StagesLightningCLI
    from lightning_stages.cli.compare import run_compare

    parser = argparse.ArgumentParser(prog="python -m examples.segmentation demo", description=demo.__doc__)
    parser.add_argument("--seeds", type=_at_least_one, default=DEMO_SEEDS,
                        help=f"seeds per schedule (default {DEMO_SEEDS})")
    parser.add_argument("--jobs", type=_at_least_one, default=DEMO_JOBS, help=f"runs at once (default {DEMO_JOBS})")
    parser.add_argument("--labelled-fraction", type=_fraction, default=None,
                        help="share of the training images whose labels the student knows (default: the configs' "
                             "0.1; 1.0: every label)")
    parser.add_argument("--out", default=None,
                        help="output directory of the comparison (default runs/segmentation_compare, or "
                             "runs/segmentation_compare_labelled_<fraction> with --labelled-fraction)")
    parser.add_argument("--retrain-teacher", action="store_true",
                        help="train the teacher even if its checkpoint exists")
    args = parser.parse_args(argv)
    _quiet_warnings()
    for path in [TEACHER_CONFIG, *SCHEDULE_CONFIGS]:
        if not path.is_file():
            print(f"demo: {path} not found; run the demo from the repository root", file=sys.stderr)
            return 2
    out = Path(args.out or "runs/segmentation_compare" + (
        "" if args.labelled_fraction is None else f"_labelled_{args.labelled_fraction:g}"))
    configs = list(SCHEDULE_CONFIGS)
    if args.labelled_fraction is not None:
        configs = with_labelled_fraction(configs, args.labelled_fraction, out / "configs")
    start = time.perf_counter()
    teacher_ckpt = Path(TEACHER_CHECKPOINT)
    unfinished = unfinished_teacher(teacher_ckpt) if teacher_ckpt.is_file() and not args.retrain_teacher else None
    if unfinished:
        print(f"demo: {teacher_ckpt} is not the finished teacher: {unfinished}", flush=True)
    if args.retrain_teacher or unfinished or not teacher_ckpt.is_file():
        print(f"demo: training the teacher ({TEACHER_CONFIG}) -> {teacher_ckpt}", flush=True)
        StagesLightningCLI(args=["fit", "--config", str(TEACHER_CONFIG), "--trainer.enable_progress_bar=false"])
    else:
        print(f"demo: using the existing teacher {teacher_ckpt} (--retrain-teacher to train it again)", flush=True)
    teacher = StagesLightningCLI(
        args=["--config", str(TEACHER_CONFIG), "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false"],
        run=False, save_config_callback=None,
    )
    model = SegmentationTeacher.load_from_checkpoint(teacher_ckpt, map_location="cpu")
    reference = teacher.trainer.test(model, datamodule=teacher.datamodule, verbose=False)[0]
    print(f"demo: teacher test/iou={reference['test/iou']:.3f} test/dice={reference['test/dice']:.3f} "
          f"test/acc={reference['test/acc']:.3f}; comparing {len(configs)} schedules x {args.seeds} seeds, "
          f"{args.jobs} at once",
          flush=True)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
        result = run_compare(
            [str(p) for p in configs], seeds=args.seeds, out=out, jobs=args.jobs,
            reference={"teacher (reference, trained once)": reference},
            echo=lambda line: print(line, flush=True),
        )
    minutes = (time.perf_counter() - start) / 60
    print(f"demo: done in {minutes:.1f} min")
    print("\n".join(result.locations()))
    return 1 if result.failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``demo`` or a LightningCLI subcommand; ``argv`` defaults to the command line."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["demo"]:
        return demo(given[1:])
    _quiet_warnings()
    from lightning_stages.cli import StagesLightningCLI

    StagesLightningCLI(args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
