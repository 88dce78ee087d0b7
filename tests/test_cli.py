"""The ``lightning-stages`` command line: validate, show, compare."""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_stages import StageConfigError
from lightning_stages.cli import StagesLightningCLI, main
from lightning_stages.cli.compare import run_compare
from lightning_stages.cli.compare_report import verdict
from lightning_stages.cli.like_for_like import like_for_like_differences

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SEED_BASE = {"bce": 1.0, "focal": 15, "dice": 1.0, "iou": 1.0, "cls": 1.0}
SCHEDULES = ["distill_finetune", "finetune_distill", "joint", "labels_only", "no_schedule"]


# ---------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("config", [f"segmentation_{n}.{ext}" for n in SCHEDULES for ext in ("yaml", "json")]
                         + ["segmentation_teacher.yaml"])
def test_validate_accepts_the_shipped_configs(config: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(CONFIGS / config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"OK {CONFIGS / config}: ")


def test_validate_reports_every_error_with_stage_field_and_value(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({
        "train": {"loss_weights": SEED_BASE},
        "stage_schedule": [
            {"name": "distill_only", "start_epoch": 0, "end_epoch": 4, "lamda_coef": 1.0},
            {"name": "finetune_only", "start_epoch": 4, "lambda_coef": -0.5},
        ],
    }))
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "stage 0 ('distill_only'): `lamda_coef` = 1.0: is not a stage field; did you mean `lambda_coef`?" in err
    assert "stage 1 ('finetune_only'): `lambda_coef` = -0.5: must be >= 0" in err


def test_a_trainer_section_in_a_file_of_its_own_is_read_and_checked(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    # trainer: trainer.yaml, read from the config's folder as LightningCLI reads it; refused as "not a mapping" before
    (tmp_path / "trainer.yaml").write_text(
        "max_epochs: 4\ncallbacks:\n  - class_path: lightning_stages.StageScheduleCallback\n    init_args:\n"
        "      stage_schedule: [{name: kd, start_epoch: 0, end_epoch: 2}, {name: ft, start_epoch: 2, lamda_coef: 1}]\n")
    config = tmp_path / "run.yaml"
    config.write_text("trainer: trainer.yaml\nmodel: {class_path: lightning.pytorch.demos.boring_classes.BoringModel}\n")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "stage 1 ('ft'): `lamda_coef` = 1: is not a stage field; did you mean `lambda_coef`?" in err
    assert "must be a mapping" not in err
    with pytest.raises(StageConfigError, match=r"`lamda_coef` = 1: is not a stage field"):  # before parsing
        StagesLightningCLI(args=["--config", str(config)], run=False, save_config_callback=None)
    (tmp_path / "trainer.yaml").write_text((tmp_path / "trainer.yaml").read_text().replace("lamda_coef: 1", "end_epoch: 4"))
    assert main(["validate", str(config)]) == 0
    assert "2 stages over 4 epochs (kd [0, 2), ft [2, 4))" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--trainer.callbacks=[{entry}]", "--trainer.callbacks+={entry}"])
def test_stage_schedules_of_callbacks_given_whole_on_the_command_line_are_checked_before_parsing(option: str) -> None:
    # the parser's 77-line message named the key on line 65, with no did-you-mean
    entry = ("{class_path: lightning_stages.StageScheduleCallback, init_args: {stage_schedule: [{start_epoch: 0, "
             "lamda_coef: 0.5}]}}")
    with pytest.raises(StageConfigError, match=r"stage 0: `lamda_coef` = 0.5: is not a stage field; did you mean "
                                               r"`lambda_coef`\?"):
        StagesLightningCLI(args=["--model=lightning.pytorch.demos.boring_classes.BoringModel",
                                 option.format(entry=entry)], run=False, save_config_callback=None)
    cli = StagesLightningCLI(args=["--model=lightning.pytorch.demos.boring_classes.BoringModel", "--trainer.logger=false",
                                   option.format(entry=entry.replace("lamda_coef", "lambda_coef"))],
                             run=False, save_config_callback=None)
    assert [type(c).__name__ for c in cli.trainer.callbacks].count("StageScheduleCallback") == 1


def test_validate_checks_loss_weights_against_the_model_of_a_lightning_config(
    tiny_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stages = [{"name": "kd", "start_epoch": 0, "distillation": True, "loss_weights": {"foacl": 0}}]
    config = tiny_config("joint", tmp_path, teacher=None, stages=stages)
    assert main(["validate", str(config)]) == 2
    assert "stage 0 ('kd'): `loss_weights.foacl` = 0: is not a task loss of this module; did you mean `focal`?" in \
        capsys.readouterr().err


def test_validate_takes_the_callbacks_best_weights_argument(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `best_weights` is an argument of the callback (and `--print_config` writes it), not of the schedule
    callback = {"class_path": "lightning_stages.StageScheduleCallback",
                "init_args": {"best_weights": "file", "verbose": False,
                              "stage_schedule": [{"name": "kd", "start_epoch": 0, "end_epoch": 2}]}}
    config = tmp_path / "cli.yaml"
    config.write_text(json.dumps({"trainer": {"max_epochs": 4, "callbacks": [callback]}}))
    assert main(["validate", str(config)]) == 0
    assert "1 stage over 4 epochs (kd [0, 2), base [2, 4))" in capsys.readouterr().out
    callback["init_args"]["best_weights"] = "fiel"
    config.write_text(json.dumps({"trainer": {"max_epochs": 4, "callbacks": [callback]}}))
    assert main(["validate", str(config)]) == 2
    assert ("trainer.callbacks[0] (StageScheduleCallback): `best_weights` = 'fiel': must be 'memory' or 'file'; "
            "did you mean `file`?") in capsys.readouterr().err


def test_validate_refuses_callback_arguments_outside_init_args(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # LightningCLI's parser refuses this entry; validate said "OK ... no stage schedule"
    callback = {"class_path": "lightning_stages.StageScheduleCallback",
                "stage_schedule": [{"name": "kd", "start_epoch": 0, "end_epoch": 2}], "init_arg": {}}
    config = tmp_path / "cli.yaml"
    config.write_text(json.dumps({"trainer": {"max_epochs": 4, "callbacks": [callback]}}))
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert ("config: `trainer.callbacks[0].stage_schedule` = [{'end_epoch': 2, 'name': 'kd', 'start_epoch': 0}]: "
            "is not a key of a callback entry; the callback's arguments go under `init_args`") in err
    assert "`trainer.callbacks[0].init_arg` = {}: is not a key of a callback entry" in err
    assert "did you mean `init_args`?" in err


def test_lightning_config_values_are_checked_as_the_cli_parser_reads_them() -> None:
    # LightningCLI's parser turns a YAML "0.5" into the float it types, so fit trains with it; the check refused it
    from lightning_stages.cli.lightning_config import check_lightning_config
    from lightning_stages.errors import StageConfigError

    init_args = {"lambda_coef": "0.5", "loss_weights": {"bce": "2"},
                 "stage_schedule": [{"name": "kd", "start_epoch": 0, "end_epoch": "2", "distillation": "true",
                                     "lambda_coef": "0.25"}]}
    config = {"trainer": {"callbacks": [{"class_path": "lightning_stages.StageScheduleCallback",
                                         "init_args": init_args}]}}
    ((schedule, overrides),) = check_lightning_config(config)
    (stage,) = schedule.stages
    assert (stage.end_epoch, stage.distillation, stage.lambda_coef) == (2, True, 0.25)
    assert (schedule.lambda_coef, overrides) == (0.5, {"bce": 2.0})
    init_args["stage_schedule"][0]["lambda_coef"] = "half"  # the parser refuses it too
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\): `lambda_coef` = 'half': must be a number"):
        check_lightning_config(config)


def test_validate_reads_a_string_max_epochs_as_the_cli_parser_does(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    # LightningCLI trains `max_epochs: "1"` as 1 epoch, so `fit` refuses this stage; validate ignored the epochs
    callback = {"class_path": "lightning_stages.StageScheduleCallback",
                "init_args": {"stage_schedule": [{"name": "late", "start_epoch": 2, "distillation": True}]}}
    config = tmp_path / "cli.yaml"
    config.write_text(json.dumps({"trainer": {"max_epochs": "1", "callbacks": [callback]}}))
    assert main(["validate", str(config)]) == 2
    assert "stage 0 ('late'): `start_epoch` = 2: starts at or beyond max_epochs (1)" in capsys.readouterr().err


def test_validate_with_max_epochs_flags_stages_that_would_never_run(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(CONFIGS / "segmentation_distill_finetune.yaml"), "--max-epochs", "3"]) == 2
    assert "stage 1 ('finetune_only'): `start_epoch` = 3: starts at or beyond max_epochs (3)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("where", "class_path", "error"),
    [
        ("model.class_path", "examples.segmentaton.module.SegmentationStudent", "ModuleNotFoundError: No module named"),
        ("trainer.callbacks[0].class_path", "lightning_stages.StageSchedulCallback", "AttributeError: module"),
    ],
)
def test_validate_reports_a_class_path_that_cannot_be_imported(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               where: str, class_path: str, error: str) -> None:
    config = tmp_path / "typo.yaml"
    model_path = class_path if where.startswith("model") else "examples.segmentation.module.SegmentationStudent"
    callback_path = class_path if where.startswith("trainer") else "lightning_stages.StageScheduleCallback"
    config.write_text(f"model:\n  class_path: {model_path}\ntrainer:\n  max_epochs: 2\n  callbacks:\n"
                      f"  - class_path: {callback_path}\n    init_args: {{stage_schedule: [{{start_epoch: 0}}]}}\n")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"config: `{where}` = '{class_path}': cannot be imported ({error}" in err


@pytest.mark.parametrize("kind", ["seed", "lightning"])
def test_validate_checks_each_stage_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, tiny_config) -> None:
    from lightning_stages.schedule import checks

    parsed: list[int] = []
    parse_stage = checks.parse_stage
    monkeypatch.setattr(checks, "parse_stage", lambda entry, index: (parsed.append(index), parse_stage(entry, index))[1])
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True}, {"start_epoch": 1}][: 2 if kind == "seed" else 1]
    if kind == "seed":
        config = tmp_path / "s.json"
        config.write_text(json.dumps({"train": {"epochs": 3, "loss_weights": SEED_BASE}, "stage_schedule": stages}))
    else:
        config = tiny_config("joint", tmp_path, teacher=None, stages=stages)
    assert main(["validate", str(config)]) == 0
    assert parsed == ([0, 1] if kind == "seed" else [0])


def test_validate_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(tmp_path / "nope.json")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_validate_an_empty_path_names_it_not_the_working_directory(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", ""]) == 2
    err = capsys.readouterr().err
    assert "cannot read config file '': the path is empty" in err and "'.'" not in err  # before: named '.'


# ---------------------------------------------------------------------------------------------- show


def test_show_prints_every_range_with_its_settings(capsys: pytest.CaptureFixture) -> None:
    assert main(["show", str(CONFIGS / "segmentation_finetune_distill.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("epochs")))
    rows = [line.split() for line in lines[header:]]
    assert rows[0] == ["epochs", "stage", "distillation", "lambda", "bce", "focal", "dice", "iou", "cls", "data"]
    assert rows[1] == ["[0,", "3)", "finetune_first", "(1/2)", "off", "0", "1", "15", "1", "1", "1", "labelled"]
    assert rows[2] == ["[3,", "9)", "distill_second", "(2/2)", "on", "1", "0", "0", "0", "0", "0", "all"]
    assert len(rows) == 3


def test_show_plot_writes_a_png(tmp_path: Path) -> None:
    png = tmp_path / "timeline.png"
    assert main(["show", str(CONFIGS / "segmentation_distill_finetune.yaml"), "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_plot_of_a_schedule_without_weights_warns_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # no loss weights anywhere: matplotlib's "No artists with labels found to put in legend" used to reach the user
    config = tmp_path / "kd.json"
    config.write_text(json.dumps({"stage_schedule": [
        {"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True}]}))
    png = tmp_path / "timeline.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["show", str(config), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "warning" not in capsys.readouterr().err.lower()


def test_show_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "timeline.png"
    assert main(["show", str(CONFIGS / "segmentation_joint.json"), "--plot", str(png)]) == 1
    captured = capsys.readouterr()
    assert "pip install 'lightning-stages[plot]'" in captured.err
    assert "joint (1/1)" in captured.out  # the table is still printed
    assert not png.exists()


# ---------------------------------------------------------------------------------------------- compare logic


def test_verdict_names_a_winner_only_beyond_the_spread() -> None:
    a, b = [0.80, 0.82, 0.81], [0.70, 0.71, 0.69]
    gap = statistics.mean(a) - statistics.mean(b)
    assert gap > statistics.stdev(a) + statistics.stdev(b)
    assert verdict({"a": a, "b": b}).startswith("**a** is best")
    assert verdict({"b": b, "a": a}).startswith("**a** is best")


def test_verdict_calls_overlapping_results_indistinguishable() -> None:
    a, b = [0.80, 0.70, 0.75], [0.76, 0.74, 0.75]
    assert abs(statistics.mean(a) - statistics.mean(b)) < statistics.stdev(a) + statistics.stdev(b)
    assert "indistinguishable" in verdict({"a": a, "b": b})


def test_verdict_with_one_seed_names_no_winner() -> None:
    assert "no winner" in verdict({"a": [0.9], "b": [0.1]})


def test_shipped_schedule_configs_compare_like_for_like() -> None:
    assert like_for_like_differences([CONFIGS / f"segmentation_{n}.yaml" for n in SCHEDULES]) == []


def test_like_for_like_differences_name_the_setting(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    a = tiny_config("joint", tmp_path, teacher=None, file_name="a.yaml")
    b = tiny_config("no_schedule", tmp_path, teacher=None, file_name="b.yaml", data={"num_train": 48})
    assert like_for_like_differences([a, b]) == ["b.yaml: data.init_args.num_train = 48, but 32 in a.yaml"]


def _nested(folder: Path, name: str, model: str, width: int) -> Path:
    """A config in ``folder`` whose model is the nested file ``model.yaml`` there (LightningCLI reads it from the
    config's folder), with ``width`` as its one setting."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(f"class_path: my.Net\ninit_args: {{width: {width}, lambda_coef: 1.0}}\n")
    path = folder / name
    path.write_text(f"trainer: {{max_epochs: 2}}\nmodel: {model}\ndata: {{init_args: {{num_train: 8}}}}\n")
    return path


def test_like_for_like_differences_is_still_importable_from_lightning_config() -> None:
    from lightning_stages.cli import lightning_config

    assert lightning_config.like_for_like_differences is like_for_like_differences


def test_like_for_like_reads_a_nested_config_file_by_its_content(tmp_path: Path) -> None:
    a = _nested(tmp_path / "x", "a.yaml", "model.yaml", width=8)
    b = _nested(tmp_path / "y", "b.yaml", "model.yaml", width=16)  # one name, another model: compared as equal before
    assert like_for_like_differences([a, b]) == ["b.yaml: model.init_args.width = 16, but 8 in a.yaml"]
    inline = tmp_path / "y" / "c.yaml"  # the same model written out: alike (a difference before), schedule keys aside
    inline.write_text("trainer: {max_epochs: 2}\nmodel: {class_path: my.Net, init_args: {width: 8, lambda_coef: 2}}"
                      "\ndata: {init_args: {num_train: 8}}\n")
    assert like_for_like_differences([a, inline]) == []
    bare = tmp_path / "y" / "d.yaml"  # a bare class path counts as the class path
    bare.write_text("trainer: {max_epochs: 2}\nmodel: other.Net\ndata: {init_args: {num_train: 8}}\n")
    assert like_for_like_differences([inline, bare])[0] == "d.yaml: model.class_path = 'other.Net', but 'my.Net' in c.yaml"


def test_like_for_like_counts_the_trainers_and_the_optimizers_settings(tmp_path: Path) -> None:
    # only trainer.max_epochs counted: configs with other precision, accumulation or optimizer compared silently
    base = ("trainer: {max_epochs: 2, precision: 32-true, accumulate_grad_batches: 1, logger: {init_args: {name: %s}}}\n"
            "model: my.Net\noptimizer: {class_path: torch.optim.SGD, init_args: {lr: %s}}\n")
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text(base % ("a", "0.1"))
    b.write_text((base % ("b", "0.1")).replace("32-true", "bf16-mixed").replace("batches: 1", "batches: 4"))
    c.write_text(base % ("c", "0.01"))  # another logger name alone does not count; another learning rate does
    assert like_for_like_differences([a, b, c]) == [
        "b.yaml: trainer.accumulate_grad_batches = 4, but 1 in a.yaml",
        "b.yaml: trainer.precision = 'bf16-mixed', but '32-true' in a.yaml",
        "c.yaml: optimizer.init_args.lr = 0.01, but 0.1 in a.yaml",
    ]


def test_like_for_like_with_a_nested_file_that_names_itself_or_cannot_be_read(tmp_path: Path) -> None:
    a = _nested(tmp_path / "x", "a.yaml", "model.yaml", width=8)
    (tmp_path / "x" / "model.yaml").write_text("class_path: my.Net\ninit_args: {sub: model.yaml}\n")
    b = _nested(tmp_path / "y", "b.yaml", "model.yaml", width=8)
    (tmp_path / "y" / "model.yaml").write_bytes(b"\xff\xfe")  # not text: counts by its name
    assert like_for_like_differences([a, b]) == [
        "b.yaml: model.class_path = 'model.yaml', but 'my.Net' in a.yaml",
        "b.yaml: model.init_args.sub = None, but 'model.yaml' in a.yaml",
    ]


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file names must be UTF-8")
def test_like_for_like_of_nested_files_that_each_name_the_next_twice_ends(tmp_path: Path) -> None:
    """``f{i}.yaml`` = ``{a: f{i+1}.yaml, b: f{i+1}.yaml}``: every level doubled the expansion (40 levels: 2**40
    values, a hang); each file is now read once, and beyond 10,000 values in all a file counts by its name."""
    for i in range(40):
        (tmp_path / f"f{i}.yaml").write_text(f"a: f{i + 1}.yaml\nb: f{i + 1}.yaml\n")
    (tmp_path / "f40.yaml").write_text("leaf: 1\n")
    for name, leaf in (("a.yaml", "f0.yaml"), ("b.yaml", "f0.yaml"), ("c.yaml", "f39.yaml")):
        (tmp_path / name).write_text(f"model: {{init_args: {{x: {leaf}}}}}\n")
    assert like_for_like_differences([tmp_path / "a.yaml", tmp_path / "b.yaml"]) == []
    assert like_for_like_differences([tmp_path / "c.yaml", tmp_path / "c.yaml"]) == []
    assert like_for_like_differences([tmp_path / "a.yaml", tmp_path / "c.yaml"])  # they differ, whatever the depth


def test_like_for_like_names_a_config_whose_name_is_not_utf8_as_its_bytes(tmp_path: Path) -> None:
    a = _nested(tmp_path, "a.yaml", "{class_path: my.Net}", width=8)
    b = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9\n.yaml"))
    b.write_text("trainer: {max_epochs: 3}\n")
    assert like_for_like_differences([a, b])[-1] == "caf\\xe9\\n.yaml: trainer.max_epochs = 3, but 2 in a.yaml"


def test_compare_warns_when_not_like_for_like(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    # both runs fail at once (no teacher): the warning comes before any training
    a = tiny_config("joint", tmp_path, teacher=None, file_name="a.yaml")
    b = tiny_config("joint", tmp_path, teacher=None, file_name="b.yaml", data={"batch_size": 8})
    with pytest.warns(UserWarning, match=r"not like for like: b.yaml: data.init_args.batch_size = 8, but 16 in a.yaml"):
        result = run_compare([a, b], seeds=1, out=tmp_path / "out", echo=lambda line: None)
    assert "Warning: not like for like" in result.report.read_text()


# ---------------------------------------------------------------------------------------------- compare run


def test_tiny_compare_writes_report_curves_and_tensorboard(
    tiny_config: Callable[..., Path], tmp_path: Path, teacher_ckpt: Path, capsys: pytest.CaptureFixture
) -> None:
    joint = tiny_config("joint", tmp_path, teacher_ckpt, stages=[
        {"name": "joint", "start_epoch": 0, "distillation": True, "lambda_coef": 1.0}])
    plain = tiny_config("no_schedule", tmp_path, teacher_ckpt)
    broken = tiny_config("joint", tmp_path, teacher_ckpt, file_name="broken.yaml",
                         stages=[{"name": "kd", "start_epoch": 0, "lamda_coef": 1.0}])
    out = tmp_path / "out"
    code = main(["compare", str(joint), str(plain), str(broken), "--seeds", "1", "--out", str(out), "--jobs", "1"])
    stdout = capsys.readouterr().out
    assert code == 1  # one run failed; the others still ran and the report was written
    assert re.search(r"^\[1/3\] joint seed 0: test/iou=\d\.\d{3}", stdout, re.M)
    assert re.search(r"^\[2/3\] no_schedule seed 0: test/iou=\d\.\d{3}", stdout, re.M)
    assert re.search(r"^\[3/3\] broken seed 0: FAILED: StageConfigError", stdout, re.M)
    assert f"report: {out / 'report.md'}" in stdout

    report = (out / "report.md").read_text()
    summary = report.split("## Verdict")[0]  # the first table: one row per schedule
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in summary.splitlines() if line.startswith("| ")}
    assert rows["schedule"][:3] == ["test IoU", "test Dice", "test accuracy"]
    for name in ("joint", "no_schedule"):
        assert all(0.0 <= float(v) <= 1.0 for v in rows[name][:3]) and rows[name][4] == "1/1"
    assert rows["broken"][4] == "0/1 (FAILED)"
    assert "- **broken**, seed 0: failed: `StageConfigError" in report and "lamda_coef" in report
    assert "spread across seeds is unknown, so no winner is named" in report

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("joint", "no_schedule"):
        events = EventAccumulator(str(out / "runs" / name / "seed_0"))
        events.Reload()
        assert {"val/iou", "val/dice", "val/acc", "test/iou"} <= set(events.Tags()["scalars"])
