"""Config and CLI input found wrong in review (issue 10): each bad input is a ``StageConfigError`` naming the stage,
the field and the value (exit 2 and a short message from the command line), a damaged checkpoint state warns or is
refused, and nothing escapes as a raw exception.
"""

from __future__ import annotations

import json
import math
import os
import threading
from fractions import Fraction
from pathlib import Path

import pytest

from lightning_stages.cli import main
from lightning_stages.cli.lightning_config import schedule_of_config


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _json(tmp_path: Path, data: object, name: str = "c.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_seed_config_with_a_model_key_still_has_its_schedule_checked(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    path = _json(tmp_path, {"model": {}, "data": {"root": "x"}, "train": {"epochs": 4},
                            "stage_schedule": [{"name": "a", "start_epoch": 0, "lambda_coef": -5}]})
    code, out, err = _run(capsys, "validate", str(path))
    assert code == 2 and "OK" not in out
    assert "stage 0 ('a')" in err and "`lambda_coef` = -5" in err


@pytest.mark.parametrize(("callbacks", "field", "value"), [
    ("7", "trainer.callbacks", "7"),
    ("[{class_path: lightning_stages.StageScheduleCallback, init_args: [1, 2]}]", "trainer.callbacks[0].init_args",
     "[1, 2]"),
    ("[{class_path: lightning_stages.StageScheduleCallback, init_args: abc}]", "trainer.callbacks[0].init_args",
     "'abc'"),
])
@pytest.mark.parametrize("no_import", [False, True])
def test_lightning_config_callbacks_of_the_wrong_shape_are_a_problem_naming_the_field(
        tmp_path: Path, capsys: pytest.CaptureFixture, callbacks: str, field: str, value: str, no_import: bool) -> None:
    path = tmp_path / "cli.yaml"
    path.write_text(f"trainer:\n  max_epochs: 5\n  callbacks: {callbacks}\n")
    code, out, err = _run(capsys, "validate", *(["--no-import"] if no_import else []), str(path))
    assert code == 2 and out == ""
    assert f"`{field}` = {value}: must be a" in err and "Traceback" not in err


@pytest.mark.parametrize(("config", "shown", "kind"), [("123", "123", "int"), ("[a.json]", "['a.json']", "list"),
                                                    ("{a: 1}", "{'a': 1}", "dict")])
def test_a_callback_config_that_is_not_a_path_is_a_problem_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture, config: str, shown: str, kind: str) -> None:
    path = tmp_path / "cli.yaml"
    path.write_text("trainer:\n  max_epochs: 5\n  callbacks:\n  - class_path: lightning_stages.StageScheduleCallback\n"
                    f"    init_args: {{config: {config}}}\n")
    code, out, err = _run(capsys, "validate", str(path))
    assert code == 2 and out == ""
    assert err == (f"{path}: 1 problem in the stage schedule:\n  - StageScheduleCallback: `config` = {shown}: must be "
                   f"the path of a JSON or YAML config file, not {kind}\n")


@pytest.mark.parametrize("config", [123, ["a.json"], {"stage_schedule": []}, b"c.json"])
def test_a_config_argument_that_is_not_a_path_is_a_problem_from_python(config: object) -> None:
    from lightning_stages import StageConfigError, StageSchedule, StageScheduleCallback

    with pytest.raises(StageConfigError) as caught:
        StageScheduleCallback(config=config)  # type: ignore[arg-type]
    assert [(p.name, p.field, p.value) for p in caught.value.problems] == [("StageScheduleCallback", "config", config)]
    if isinstance(config, dict):  # a loaded mapping is what from_config also reads
        assert StageSchedule.from_config(config).stages == ()
        return
    with pytest.raises(StageConfigError) as caught:
        StageSchedule.from_config(config)  # type: ignore[arg-type]
    assert [(p.field, p.value) for p in caught.value.problems] == [("config", config)]
    assert str(caught.value).endswith(f"must be the path of a JSON or YAML config file or a mapping, not "
                                      f"{type(config).__name__}")


@pytest.mark.parametrize(("key", "shown"), [("yes", "True"), ("null", "None"), ("1", "1")])
def test_a_yaml_base_loss_weight_key_read_as_no_string_is_a_problem_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture, key: str, shown: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"train: {{epochs: 6, loss_weights: {{{key}: 1.0}}}}\n"
                    "stage_schedule: [{name: kd, start_epoch: 0, loss_weights: {zzz: 0}}]\n")
    code, out, err = _run(capsys, "validate", str(path))
    assert code == 2 and out == ""
    assert err == (f"{path}: 2 problems in the stage schedule:\n  - base: `loss_weights` = {shown}: loss names must be "
                   f"strings\n  - stage 0 ('kd'): `loss_weights.zzz` = 0: is not a task loss of this module; the task "
                   f"losses are: {shown}\n")


_STAGES = [{"name": "kd", "start_epoch": 0, "end_epoch": 6, "monitor": "val/loss", "patience": 1},
           {"name": "ft", "start_epoch": 6}]
_GOOD_ADAPTIVE = {"transitions": {0: 4}, "tracker": {"stage": 0, "mode": "min", "min_delta": 0.0, "best": 0.5,
                                                     "best_epoch": 2, "wait": 1, "restored": False},
                  "best_weights": {"where": "memory", "weights": None, "path": None}}
DAMAGED_ADAPTIVE = {
    "a string": "garbage", "None": None, "a list": [1, 2], "a huge int": 10**400,
    "transitions a string": {"transitions": "x"}, "transitions a list": {"transitions": [1, 2]},
    "tracker a string": {"tracker": "x"}, "tracker of unknown fields": {"tracker": {"a": 1}},
    "tracker best a string": {"tracker": {"stage": 0, "best": "x", "best_epoch": 1}},
    "tracker best without its epoch": {"tracker": {"stage": 0, "best": 0.5}},
    "tracker wait negative": {"tracker": {"stage": 0, "wait": -1}},
    "best_weights a string": {"best_weights": "s"}, "best_weights path a list": {"best_weights": {"path": [1]}},
}


def _checkpoint(tmp_path: Path, state: dict) -> Path:
    import torch

    path = tmp_path / "run.ckpt"
    torch.save({"callbacks": {"StageScheduleCallback": state}}, path)
    return path


@pytest.mark.parametrize("case", list(DAMAGED_ADAPTIVE))
def test_resuming_with_a_damaged_adaptive_state_warns_and_drops_it(case: str) -> None:
    from lightning_stages import StageScheduleCallback

    callback = StageScheduleCallback(stage_schedule=_STAGES, verbose=False)
    callback.load_state_dict({"schedule": {"stage_schedule": _STAGES}, "adaptive": _GOOD_ADAPTIVE})
    assert callback.adaptive.transitions == {0: 4}  # a good state is read
    with pytest.warns(UserWarning, match="adaptive state in the checkpoint could not be read"):
        callback.load_state_dict({"schedule": {"stage_schedule": _STAGES}, "adaptive": DAMAGED_ADAPTIVE[case]})
    assert callback.adaptive.transitions == {} and callback.adaptive.tracker is None
    assert callback.adaptive.best.empty


@pytest.mark.parametrize("case", list(DAMAGED_ADAPTIVE))
def test_show_checkpoint_with_a_damaged_adaptive_state_exits_2_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    path = _checkpoint(tmp_path, {"schedule": {"stage_schedule": _STAGES}, "adaptive": DAMAGED_ADAPTIVE[case]})
    code, out, err = _run(capsys, "show", "--checkpoint", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"{path}: ") and "adaptive" in err


@pytest.mark.parametrize("schedule", [None, [1], "SCHEDULE_FILE"])
def test_show_checkpoint_never_opens_a_string_schedule_as_a_file(
        tmp_path: Path, capsys: pytest.CaptureFixture, schedule: object) -> None:
    other = _json(tmp_path, {"stage_schedule": _STAGES, "train": {"epochs": 9}}, "other.json")
    path = _checkpoint(tmp_path, {"schedule": str(other) if schedule == "SCHEDULE_FILE" else schedule})
    code, out, err = _run(capsys, "show", "--checkpoint", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "`schedule`" in err and "must be a mapping" in err


def test_show_checkpoint_escapes_control_characters_of_the_monitor(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    stages = [{**_STAGES[0], "monitor": "val\x1b[31m/loss\nFORGED"}, _STAGES[1]]
    path = _checkpoint(tmp_path, {"schedule": {"stage_schedule": stages, "train": {"epochs": 9}},
                                  "adaptive": _GOOD_ADAPTIVE})
    code, out, _ = _run(capsys, "show", "--checkpoint", str(path))
    assert code == 0 and "\x1b" not in out and "\nFORGED" not in out
    assert "on a plateau of val\\x1b[31m/loss\\nFORGED (cap 6); best 0.5 at epoch 2" in out


def test_a_key_given_twice_in_a_one_line_yaml_flow_mapping_is_refused(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("train: {epochs: 4}\nstage_schedule:\n"
                    "  - {name: a, start_epoch: 0, end_epoch: 2, distillation: true, distillation: false}\n")
    code, out, err = _run(capsys, "validate", str(path))
    assert code == 2 and out == ""
    assert err == (f"{path}: the key 'distillation' is given twice in one mapping (line 3, columns 45 and 65); a "
                   "parser would silently keep the last: give it once\n")


@pytest.mark.parametrize(("stage", "field"), [
    ({"start_epoch": 0, "end_epoch": 5, "ramp_epochs": 10**400}, "ramp_epochs"),
    ({"start_epoch": 0, "monitor": "v", "patience": 2, "min_delta": 10**400}, "min_delta"),
    ({"start_epoch": 10**400}, "start_epoch"),
    ({"start_epoch": 0, "end_epoch": 10**400}, "end_epoch"),
    ({"start_step": 10**400}, "start_step"),
    ({"start_step": 0, "end_step": 10**400}, "end_step"),
    ({"start_step": 0, "ramp_steps": 10**400}, "ramp_steps"),  # open-ended: no stage length to be longer than
    ({"start_epoch": 0, "ramp_steps": 10**400}, "ramp_steps"),
    ({"start_epoch": 0, "monitor": "v", "patience": 10**400}, "patience"),
    ({"start_epoch": 0, "monitor": "v", "patience": 2, "min_epochs": 10**400}, "min_epochs"),
    ({"start_step": 0, "monitor": "v", "patience": 2, "min_steps": 10**400}, "min_steps"),
])
def test_integers_too_large_for_a_float_are_a_problem_naming_stage_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture, stage: dict, field: str) -> None:
    from lightning_stages import StageConfigError, StageSchedule

    with pytest.raises(StageConfigError) as caught:
        StageSchedule([{"name": "big", **stage}])
    assert [(p.index, p.name, p.field) for p in caught.value.problems] == [(0, "big", field)]
    assert "is too large (more than 1.8e+308)" in str(caught.value) and len(str(caught.value)) < 200
    path = _json(tmp_path, {"stage_schedule": [{"name": "big", **stage}]})
    code, out, err = _run(capsys, "validate", str(path))
    assert code == 2 and out == "" and f"stage 0 ('big'): `{field}` = <an integer of more than" in err


_HUGE = Fraction(10**400, 1)
# where a real number beyond a float's range can be given: (callback arguments, (index, name, field) of the problem)
BEYOND_FLOAT = {
    "stage lambda_coef": ({"stage_schedule": [{"name": "big", "start_epoch": 0, "lambda_coef": _HUGE}]},
                          (0, "big", "lambda_coef")),
    "stage start_epoch": ({"stage_schedule": [{"name": "big", "start_epoch": _HUGE}]}, (0, "big", "start_epoch")),
    "stage loss weight": ({"stage_schedule": [{"name": "big", "start_epoch": 0, "loss_weights": {"bce": _HUGE}}],
                           "loss_weights": {"bce": 1.0}}, (0, "big", "loss_weights.bce")),
    "stage ramp_epochs": ({"stage_schedule": [{"name": "big", "start_epoch": 0, "ramp_epochs": _HUGE}]},
                          (0, "big", "ramp_epochs")),
    "stage min_delta": ({"stage_schedule": [{"name": "big", "start_epoch": 0, "monitor": "v", "patience": 1,
                                             "min_delta": _HUGE}]}, (0, "big", "min_delta")),
    "callback loss_weights": ({"loss_weights": {"bce": _HUGE}}, (None, "base", "loss_weights.bce")),
    "callback lambda_coef": ({"lambda_coef": _HUGE}, (None, "base", "lambda_coef")),
    "not a whole number": ({"lambda_coef": Fraction(10**400 + 1, 3)}, (None, "base", "lambda_coef")),
    "negative": ({"loss_weights": {"bce": -_HUGE}}, (None, "base", "loss_weights.bce")),
}


@pytest.mark.parametrize("case", list(BEYOND_FLOAT))
def test_a_fraction_beyond_a_float_is_too_large_not_an_overflow(case: str) -> None:
    from lightning_stages import StageConfigError, StageScheduleCallback

    arguments, where = BEYOND_FLOAT[case]
    with pytest.raises(StageConfigError) as caught:
        StageScheduleCallback(**arguments)
    assert [(p.index, p.name, p.field) for p in caught.value.problems] == [where]
    assert "is too large (more than 1.8e+308)" in str(caught.value) and len(str(caught.value)) < 200


def test_plain_keeps_real_numbers_within_a_float_and_gives_those_beyond_as_ints() -> None:
    np = pytest.importorskip("numpy")
    from lightning_stages.schedule.stage import plain

    assert plain(Fraction(1, 4)) == 0.25 and type(plain(Fraction(1, 4))) is float
    assert plain(_HUGE) == 10**400 and plain(-_HUGE) == -(10**400)
    assert plain(np.longdouble("inf")) == math.inf  # infinite in its own type: stays infinite ("must be finite")
    if np.finfo(np.longdouble).max > 1e308:  # a long double wider than a float (not on every platform)
        assert plain(np.longdouble("1e400")) == int(np.longdouble("1e400")) > 10**399


def _self_referring() -> dict:
    weights: dict = {"bce": 1.0}
    weights["again"] = weights
    return weights


@pytest.mark.parametrize(("arguments", "where"), [
    ({"stage_schedule": [{"name": "kd", "start_epoch": 0, "loss_weights": _self_referring()}, {"start_epoch": -1}]},
     [(0, "kd", "loss_weights"), (1, None, "start_epoch")]),
    ({"stage_schedule": [{"start_epoch": 0}], "loss_weights": _self_referring()}, [(None, "base", "loss_weights")]),
    ({"lambda_coef": [_self_referring()]}, [(None, "base", "lambda_coef")]),
])
def test_a_value_that_refers_to_itself_is_a_problem_naming_its_field(arguments: dict, where: list) -> None:
    from lightning_stages import StageConfigError, StageScheduleCallback

    with pytest.raises(StageConfigError) as caught:
        StageScheduleCallback(**arguments)
    assert [(p.index, p.name, p.field) for p in caught.value.problems] == where
    assert caught.value.problems[0].message == "refers to itself" and len(str(caught.value)) < 400


def test_a_self_referring_base_weight_is_named_shortened() -> None:
    from lightning_stages import StageConfigError, StageSchedule

    with pytest.raises(StageConfigError) as caught:
        StageSchedule([], loss_weights=_self_referring())
    assert str(caught.value) == ("1 problem in the stage schedule:\n  - base: `loss_weights` = {'again': {'again': "
                                 "{'again': {...}, 'bce': 1.0}, 'bce': 1.0}, 'bce': 1.0}: refers to itself")


def test_a_python_value_nested_deeper_than_a_config_may_be_is_refused() -> None:
    from lightning_stages import StageConfigError, StageSchedule

    deep: list = []
    for _ in range(2000):  # deeper than Python's recursion limit allows a recursive copy
        deep = [deep]
    with pytest.raises(StageConfigError) as caught:
        StageSchedule([{"name": "deep", "start_epoch": 0, "data": deep}])
    assert [(p.index, p.name, p.field, p.message) for p in caught.value.problems] == [
        (0, "deep", "data", "is nested too deeply (100 levels at most)")]


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_show_of_a_ramp_beyond_any_float_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           unit: str) -> None:
    path = _json(tmp_path, {"stage_schedule": [{f"start_{unit}": 0, f"end_{unit}": 5, "distillation": True},
                                               {f"start_{unit}": 5, "ramp_steps": 10**400}]})
    code, out, err = _run(capsys, "show", str(path))
    assert code == 2 and out == ""
    assert err == (f"{path}: 1 problem in the stage schedule:\n  - stage 1: `ramp_steps` = <an integer of more than "
                   "399 digits>: is too large (more than 1.8e+308)\n")


def test_an_overlap_message_shortens_the_name_of_the_stage_overlapped() -> None:
    from lightning_stages import StageConfigError, StageSchedule

    with pytest.raises(StageConfigError) as caught:
        StageSchedule([{"name": "x" * 5000, "start_epoch": 0, "end_epoch": 5}, {"start_epoch": 3}])
    message = str(caught.value)
    assert "overlaps stage 0 ('xxx" in message and "...x" in message and len(message) < 300


def test_show_plot_of_values_matplotlib_cannot_draw_exits_2_with_one_line(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    path = _json(tmp_path, {"train": {"epochs": 4, "loss_weights": {"bce": 1.7e308}},
                            "distillation": {"lambda_coef": 1.7e308},
                            "stage_schedule": [{"name": "a", "start_epoch": 0, "end_epoch": 2, "lambda_coef": 0,
                                                "distillation": True, "loss_weights": {"bce": 0}},
                                               {"name": "b", "start_epoch": 2, "ramp_epochs": 1,
                                                "distillation": True}]})
    code, _, err = _run(capsys, "show", str(path), "--plot", str(tmp_path / "t.png"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"--plot: cannot draw the timeline of {str(path)!r}: ")


def test_show_plot_of_a_start_beyond_any_float_is_refused_before_drawing(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    path = _json(tmp_path, {"stage_schedule": [{"name": "a", "start_epoch": 0, "end_epoch": 2},
                                               {"name": "b", "start_epoch": 10**400}]})
    code, out, err = _run(capsys, "show", str(path), "--plot", str(tmp_path / "t.png"))
    assert code == 2 and out == "" and not (tmp_path / "t.png").exists()
    assert "stage 1 ('b'): `start_epoch` = <an integer of more than 399 digits>: is too large" in err


@pytest.mark.parametrize("arguments", ["loss_weights f32", "loss_weights i64", "config lambda f32",
                                       "config distillation bool_"])
def test_numpy_numbers_in_the_callbacks_base_settings_are_taken_as_plain_numbers(arguments: str) -> None:
    np = pytest.importorskip("numpy")
    from lightning_stages import StageScheduleCallback
    from lightning_stages.schedule.bind import given_schedule

    config = str(Path(__file__).resolve().parents[1] / "configs" / "seed_distill_finetune.json")
    kwargs = {"loss_weights f32": {"stage_schedule": [{"start_epoch": 0}], "loss_weights": {"bce": np.float32(1)}},
              "loss_weights i64": {"stage_schedule": [{"start_epoch": 0}], "loss_weights": {"bce": np.int64(1)}},
              "config lambda f32": {"config": config, "lambda_coef": np.float32(0.5)},
              "config distillation bool_": {"config": config, "distillation": np.bool_(True)}}[arguments]
    StageScheduleCallback(**kwargs)  # not refused
    schedule, overrides = given_schedule(**kwargs)
    if "loss_weights" in kwargs:
        assert overrides == {"bce": 1} and type(overrides["bce"]) in (int, float)
    elif "lambda_coef" in kwargs:
        assert schedule.lambda_coef == 0.5 and type(schedule.lambda_coef) is float
    else:
        assert schedule.distillation is True


def test_show_escapes_control_characters_in_a_stages_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _json(tmp_path, {"train": {"epochs": 4, "loss_weights": {"bce": 1}},
                            "stage_schedule": [{"name": "a", "start_epoch": 0, "end_epoch": 2,
                                                "data": "all\x1b[31mRED\nforged row"},
                                               {"name": "b", "start_epoch": 2}]})
    code, out, _ = _run(capsys, "show", str(path))
    assert code == 0 and "\x1b" not in out and "\nforged row" not in out
    assert "all\\x1b[31mRED\\nforged row" in out


def test_a_5000_digit_number_in_json_with_comments_is_named_with_its_line(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "c.json"
    path.write_text('// a comment\n{"stage_schedule": [\n{"start_epoch": 0, "lambda_coef": ' + "9" * 5000 + "}]}")
    code, out, err = _run(capsys, "validate", str(path))
    assert code == 2 and out == ""
    assert err.startswith(f"{path}:3: a number has more than ") and err.count("\n") == 1


_HOSTILE = "bce\nFORGED LINE\x1b[31m"


@pytest.mark.parametrize(("config", "quoted"), [
    # a did-you-mean hint quoting a base loss name
    ({"train": {"epochs": 6, "loss_weights": {_HOSTILE: 1.0}},
      "stage_schedule": [{"name": "kd", "start_epoch": 0, "loss_weights": {"bce\nFORGED LINE\x1b[3": 0}}]},
     "did you mean `bce\\nFORGED LINE\\x1b[31m`?"),
    # the list of task losses in a message
    ({"train": {"epochs": 6, "loss_weights": {_HOSTILE: 1.0}},
      "stage_schedule": [{"name": "kd", "start_epoch": 0, "loss_weights": {"qqqqqqqqqqqqq": 0}}]},
     "the task losses are: bce\\nFORGED LINE\\x1b[31m"),
    # an import error quoting a class path
    ({"model": {"class_path": "json.M\x1b[31m\nFORGED"}, "trainer": {"max_epochs": 2}},
     "has no attribute 'M\\x1b[31m\\nFORGED'"),
])
def test_config_text_quoted_in_a_message_or_hint_reaches_the_terminal_escaped(
        tmp_path: Path, capsys: pytest.CaptureFixture, config: dict, quoted: str) -> None:
    code, out, err = _run(capsys, "validate", str(_json(tmp_path, config)))
    assert code == 2 and out == ""
    assert "\x1b" not in err and "\nFORGED" not in err  # before: the hint, the list and the import error were raw
    assert quoted in err and len(err.strip().splitlines()) == 2  # the file's line and the one problem


def test_a_note_quoting_the_parser_s_error_reaches_the_terminal_escaped(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "note_model.py").write_text(
        "import lightning.pytorch as pl\n\nclass M(pl.LightningModule):\n    def __init__(self, lr: float = 0.1):\n"
        "        super().__init__()\n")
    config = tmp_path / "c.yaml"
    config.write_text('model: {class_path: note_model.M, init_args: {lr: "\\e[31mRED\\nFORGED OK line"}}\n'
                      "trainer: {max_epochs: 2}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = _run(capsys, "validate", str(config))
    assert code == 0 and out.startswith("OK ")
    assert err.startswith("note: ") and "\x1b" not in err and "\nFORGED" not in err  # before: the parser's text, raw
    assert "Got value: \\x1b[31mRED\\n  FORGED OK line" in err


@pytest.mark.parametrize("value", ["'abc'", "1.5", "true", "1e400", ".inf"])
@pytest.mark.parametrize("key", ["max_epochs", "max_steps"])
def test_a_trainer_epoch_or_step_count_the_parser_refuses_is_refused_by_validate(
        tmp_path: Path, capsys: pytest.CaptureFixture, key: str, value: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"trainer:\n  {key}: {value}\n  callbacks:\n  - class_path: lightning_stages.StageScheduleCallback\n"
                    "    init_args: {stage_schedule: [{start_epoch: 0, end_epoch: 3}]}\n")
    code, out, err = _run(capsys, "validate", str(path))
    assert code == 2 and out == ""  # before: OK, the value ignored (LightningCLI's parser refuses it at fit)
    assert f"- config: `trainer.{key}` = " in err and "must be an integer or null" in err


@pytest.mark.parametrize(("value", "epochs"), [("9", 9), ("'9'", 9), ("null", 1000), ("-1", None)])  # null: Lightning's
def test_a_trainer_max_epochs_the_parser_takes_is_taken(tmp_path: Path, value: str, epochs: object) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"trainer:\n  max_epochs: {value}\n  callbacks:\n  - class_path: lightning_stages.StageScheduleCallback\n"
                    "    init_args: {stage_schedule: [{start_epoch: 0, end_epoch: 3}]}\n")
    assert schedule_of_config(path).total_epochs == epochs  # no error; the run's epochs when it has some


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_stream_that_never_ends_is_refused_at_the_size_limit(capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_stages.schedule.config_files.MAX_BYTES", 3 << 20)  # the real one is 256 MiB
    code, out, err = _run(capsys, "validate", "/dev/zero")  # read for ever before: memory without end
    assert code == 2 and out == ""
    assert err.strip() == "/dev/zero: larger than 3 MiB, not a config file"


def test_a_regular_file_beyond_the_size_limit_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_stages.schedule.config_files.MAX_BYTES", 1 << 20)
    path = tmp_path / "big.json"
    path.write_text('{"stage_schedule": []' + " " * (1 << 20) + "}")
    code, _, err = _run(capsys, "validate", str(path))
    assert code == 2 and err.strip() == f"{path}: larger than 1 MiB, not a config file"
    path.write_text('{"stage_schedule": []' + " " * ((1 << 20) - 22) + "}")  # 1 MiB exactly: read
    assert len(path.read_bytes()) == 1 << 20
    assert _run(capsys, "validate", str(path))[0] == 0


def _through_a_pipe(tmp_path: Path, data: bytes) -> Path:
    """A FIFO (what a shell's ``<(...)`` gives) that a thread fills with ``data``."""
    fifo = tmp_path / "stream.yaml"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "wb") as handle:
            handle.write(data)

    threading.Thread(target=write, daemon=True).start()
    return fifo


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_config_read_through_a_pipe_is_checked_as_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = "stage_schedule:\n  - {name: a, start_epoch: 0, end_epoch: 2}\n"
    code, out, _ = _run(capsys, "validate", str(_through_a_pipe(tmp_path, text.encode())))
    assert code == 0 and "1 stage (a [0, 2)" in out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize(("data", "byte", "offset"), [
    (b"stage_schedule: []\n\xff", 0xFF, 19),
    (b"#" * ((1 << 20) - 1) + b"\n\xe9x", 0xE9, 1 << 20),  # the bad byte in the second block read
    (b"stage_schedule: []\n# \xc3", 0xC3, 21),  # cut off inside a two-byte character, at the end
])
def test_binary_data_through_a_pipe_is_named_with_its_offset(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             data: bytes, byte: int, offset: int) -> None:
    fifo = _through_a_pipe(tmp_path, data)
    code, _, err = _run(capsys, "validate", str(fifo))
    assert code == 2 and err.strip() == f"{fifo}: not a text file (not UTF-8: byte {byte:#04x} at offset {offset})"


def test_yaml_is_read_with_the_types_lightningcli_reads_it_with(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """jsonargparse (LightningCLI's parser) reads ``2024-01-01`` as a string and ``1e-3`` as a number; YAML 1.1 reads
    a date and a string, so ``validate`` refused configs that train."""
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_epochs: 5\n  callbacks:\n    - class_path: lightning_stages.StageScheduleCallback\n"
                    "      init_args:\n        stage_schedule:\n          - {name: 2024-01-01, start_epoch: 0, "
                    "end_epoch: 3, distillation: true, lambda_coef: 1e-3}\n")
    code, out, err = _run(capsys, "show", str(path), "--no-import")
    assert code == 0, err
    assert "[0, 3)  2024-01-01 (1/1)  on            0.001" in out
    from lightning_stages.schedule.config_input import parse_yaml

    assert parse_yaml("a: 1e-3\nb: 2024-01-01\nc: -2E+2\nd: 1.5\ne: 7\nf: .inf") == {
        "a": 0.001, "b": "2024-01-01", "c": -200.0, "d": 1.5, "e": 7, "f": math.inf}


@pytest.mark.parametrize("model", ["model: {class_path: not_imported.Net}\n", ""])
def test_a_stage_weight_the_callbacks_own_weights_lack_is_taken_when_the_modules_are_unknown(
        tmp_path: Path, capsys: pytest.CaptureFixture, model: str) -> None:
    """With ``--no-import`` (or no model class) the module's weights are unknown: a stage weight that the callback's
    ``loss_weights`` do not name may be one of the module's, as the README says; it was refused."""
    path = tmp_path / "c.yaml"
    callback = ("trainer:\n  max_epochs: 5\n  callbacks:\n    - class_path: lightning_stages.StageScheduleCallback\n"
                "      init_args:\n        loss_weights: {bce: 2}\n        stage_schedule:\n"
                "          - {name: a, start_epoch: 0, end_epoch: 3, loss_weights: {dice: %s}}\n")
    path.write_text(model + callback % "0")
    code, out, err = _run(capsys, "validate", str(path), "--no-import")
    assert code == 0 and out.startswith(f"OK {path}: 1 stage"), err
    path.write_text(model + callback % "-1")  # what can be checked still is
    code, _, err = _run(capsys, "validate", str(path), "--no-import")
    assert code == 2 and "stage 0 ('a'): `loss_weights.dice` = -1.0: must be >= 0" in err


@pytest.mark.parametrize("text", ["", "   \n", "---\n...\n", "~\n", "trainer: {max_epochs: 3}\n"])
def test_a_schedule_file_that_holds_no_schedule_is_refused(tmp_path: Path, text: str) -> None:
    """``config=`` (and ``--stages``) naming an empty file, or a LightningCLI config, trained single-stage in silence."""
    from lightning_stages import StageConfigError, StageScheduleCallback

    path = tmp_path / "stages.yaml"
    path.write_text(text)
    with pytest.raises(StageConfigError, match=r"`config` = '.*stages.yaml': holds none of stage_schedule, train, "
                                               r"distillation: no schedule to read"):
        StageScheduleCallback(config=path)
    path.write_text("train: {epochs: 3}\n")
    assert StageScheduleCallback(config=path) is not None  # a base alone is a schedule (single-stage)
    path.write_text("stage_shedule: [{start_epoch: 0}]\n")  # a misspelt key is named as such first
    with pytest.raises(StageConfigError, match="did you mean `stage_schedule`"):
        StageScheduleCallback(config=path)


@pytest.mark.parametrize("verbose", ["no", 0, None, [False]])
def test_verbose_that_is_not_true_or_false_is_refused(verbose: object) -> None:
    """``verbose="no"`` was taken as true: a string is truthy."""
    import numpy as np

    from lightning_stages import StageConfigError, StageScheduleCallback

    with pytest.raises(StageConfigError, match=r"StageScheduleCallback: `verbose` = .*: must be true or false, not "):
        StageScheduleCallback(verbose=verbose)
    assert StageScheduleCallback(verbose=np.bool_(False)).verbose is False


def test_thousands_of_overlapping_stages_give_a_message_of_bounded_length() -> None:
    """2000 stages all starting at epoch 0 gave 1,999,000 problems (270 MB of message, 2 GB of memory); each stage now
    names at most 5 of the stages it overlaps, at most 100 problems are listed, and one more counts the rest."""
    from lightning_stages import StageConfigError, StageScheduleCallback

    with pytest.raises(StageConfigError) as caught:
        StageScheduleCallback(stage_schedule=[{"start_epoch": 0} for _ in range(2000)])
    problems = caught.value.problems
    assert len(problems) == 101
    assert str(problems[0]) == ("stage 1: `start_epoch` = 0: overlaps stage 0 which covers epochs [0, end); a stage "
                                "without `end_epoch` runs to the last epoch")
    assert [p.index for p in problems[:15]] == [1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 5]
    assert [p.index for p in problems[15:20]] == [6] * 5  # stage 6 overlaps 6 stages: 5 are named
    # 1999 * 2000 / 2 overlapping pairs, 100 of them listed
    assert str(problems[-1]) == f"schedule: {1999 * 2000 // 2 - 100} more overlaps of one stage with another, not listed"


def test_every_overlap_of_a_few_stages_is_still_named() -> None:
    from lightning_stages import StageConfigError, StageScheduleCallback

    with pytest.raises(StageConfigError) as caught:  # [0, 10) overlaps both; [2, 4) and [5, 8) do not meet
        StageScheduleCallback(stage_schedule=[{"start_epoch": 0, "end_epoch": 10}, {"start_epoch": 2, "end_epoch": 4},
                                              {"start_epoch": 5, "end_epoch": 8}, {"start_epoch": 3, "end_epoch": 6}])
    assert sorted((p.index, p.message) for p in caught.value.problems) == [
        (1, "overlaps stage 0 which covers epochs [0, 10)"), (2, "overlaps stage 0 which covers epochs [0, 10)"),
        (2, "overlaps stage 3 which covers epochs [3, 6)"), (3, "overlaps stage 0 which covers epochs [0, 10)"),
        (3, "overlaps stage 1 which covers epochs [2, 4)")]


@pytest.mark.parametrize("command", ["validate", "show"])
@pytest.mark.parametrize(("option", "value", "field"), [("--model", "my_project.models.MyModel", "model"),
                                                         ("--stages", "other.json", "stages")])
def test_options_of_a_lightning_config_are_refused_with_a_schedule_file(
        tmp_path: Path, capsys: pytest.CaptureFixture, command: str, option: str, value: str, field: str) -> None:
    # a schedule file builds no model and holds its own schedule: --model used to be ignored without a word
    path = _json(tmp_path, {"stage_schedule": [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True}]})
    code, _, err = _run(capsys, command, str(path), option, value)
    assert code == 2
    assert f"config: `{field}` = {value!r}: `{option}` goes with a LightningCLI config, not a schedule file" in err
    assert "Traceback" not in err


def test_every_problem_of_a_lightning_config_is_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture
                                                                 ) -> None:
    path = _json(tmp_path, {"trainer": {"max_epochs": -3, "max_steps": -5, "callbacks": [{"init_args": {}}]}})
    code, _, err = _run(capsys, "validate", "--no-import", str(path))
    assert code == 2
    assert "3 problems" in err
    for field in ("trainer.callbacks[0]", "trainer.max_epochs", "trainer.max_steps"):
        assert f"`{field}`" in err


_KD_CALLBACK = {"class_path": "lightning_stages.StageScheduleCallback",
                "init_args": {"stage_schedule": [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True}]}}


@pytest.mark.parametrize(("trainer", "field", "message"), [
    ({"callbacks": [_KD_CALLBACK, {"init_args": {"monitor": "val/loss"}}]}, "trainer.callbacks[1]",
     "has no `class_path`"),
    ({"callbacks": [_KD_CALLBACK, ["lightning.pytorch.callbacks.EarlyStopping"]]}, "trainer.callbacks[1]",
     "has no `class_path`"),
    ({"callbacks": [None, _KD_CALLBACK]}, "trainer.callbacks[0]", "has no `class_path`"),
    ([1, 2], "trainer", "must be a mapping of Trainer arguments, not list"),
    ({"max_epochs": -3, "callbacks": [_KD_CALLBACK]}, "trainer.max_epochs", "must be a non-negative integer or -1"),
    ({"max_steps": -2, "callbacks": [_KD_CALLBACK]}, "trainer.max_steps", "must be a non-negative integer or -1"),
])
def test_validate_refuses_what_lightning_refuses_when_the_run_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture, trainer: object, field: str, message: str) -> None:
    # these passed `validate` (exit 0), and LightningCLI or the Trainer refused them only when the run started
    path = _json(tmp_path, {"trainer": trainer, "model": {"class_path": "torch.nn.Identity"}})
    code, _, err = _run(capsys, "validate", "--no-import", str(path))
    assert code == 2, err
    assert f"`{field}`" in err and message in err
    assert "Traceback" not in err


def test_validate_keeps_passing_what_lightning_takes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a callback given as its class path alone, max_epochs -1 (no limit) with max_steps, and a null trainer key
    path = _json(tmp_path, {"trainer": {"max_epochs": -1, "max_steps": 40, "logger": None, "callbacks": [
        "lightning.pytorch.callbacks.LearningRateMonitor", _KD_CALLBACK]}})
    code, out, err = _run(capsys, "validate", "--no-import", str(path))
    assert code == 0, err
    assert "OK" in out
