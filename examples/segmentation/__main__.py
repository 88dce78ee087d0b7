"""``python -m examples.segmentation {fit,validate,test,predict} --config ...`` (LightningCLI), or ``demo``.

``demo`` answers the research question end to end: it trains the teacher (unless its checkpoint exists), tests it
for reference, then runs ``lightning-stages compare`` over distill->finetune, finetune->distill, joint, and the
plain student without a schedule, and prints where the report is.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

CONFIGS = Path("configs")
TEACHER_CONFIG = CONFIGS / "segmentation_teacher.yaml"
SCHEDULE_CONFIGS = [
    CONFIGS / "segmentation_distill_finetune.yaml",
    CONFIGS / "segmentation_finetune_distill.yaml",
    CONFIGS / "segmentation_joint.yaml",
    CONFIGS / "segmentation_no_schedule.yaml",
]
NOISE = (".*does not have many workers.*", ".*DiceScore metric currently defaults.*", ".*litlogger.*", ".*treespec.*",
         ".*smaller than the logging interval.*")


def _quiet_warnings() -> None:
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def demo(argv: Optional[list[str]] = None) -> int:
    """Teacher (if missing), then compare the schedules; prints where the report is. Returns the exit code."""
    from examples.segmentation.module import TEACHER_CHECKPOINT, SegmentationTeacher
    from lightning_stages.cli import StagesLightningCLI
    from lightning_stages.cli.compare import run_compare

    parser = argparse.ArgumentParser(prog="python -m examples.segmentation demo", description=demo.__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per schedule (default 3)")
    parser.add_argument("--out", default="runs/segmentation_compare", help="output directory of the comparison")
    parser.add_argument("--retrain-teacher", action="store_true",
                        help="train the teacher even if its checkpoint exists")
    args = parser.parse_args(argv)
    _quiet_warnings()
    for path in [TEACHER_CONFIG, *SCHEDULE_CONFIGS]:
        if not path.is_file():
            print(f"demo: {path} not found; run the demo from the repository root", file=sys.stderr)
            return 2
    start = time.perf_counter()
    teacher_ckpt = Path(TEACHER_CHECKPOINT)
    if args.retrain_teacher or not teacher_ckpt.is_file():
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
          f"test/acc={reference['test/acc']:.3f}; comparing {len(SCHEDULE_CONFIGS)} schedules x {args.seeds} seeds",
          flush=True)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
        result = run_compare(
            [str(p) for p in SCHEDULE_CONFIGS], seeds=args.seeds, out=args.out,
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
