"""`validate` and `show` read a LightningCLI config's run length as the Trainer will: Lightning's default of 1000
epochs when no limit is given, `max_steps` for a step schedule whose model is unknown; and `show --checkpoint` on a
file that is no checkpoint is one line and exit 2."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from lightning_stages.cli import main

CALLBACK = """trainer:
{trainer}  callbacks:
    - class_path: lightning_stages.StageScheduleCallback
      init_args:
        stage_schedule:
{stages}
"""


def _config(tmp_path: Path, trainer: str, stages: list[str]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CALLBACK.format(trainer=trainer, stages="\n".join(f"          - {s}" for s in stages)))
    return path


@pytest.fixture(autouse=True)
def _no_model_note():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the config names no model class: a note, not the point here
        yield


@pytest.mark.parametrize("trainer", ["", "  max_steps: -1\n", "  max_epochs: null\n"])
def test_a_config_without_limits_runs_lightnings_1000_epochs(tmp_path, capsys, trainer):
    late = _config(tmp_path, trainer, ["{name: kd, start_epoch: 0, end_epoch: 1}", "{name: late, start_epoch: 1500}"])
    assert main(["validate", str(late)]) == 2
    assert "stage 1 ('late'): `start_epoch` = 1500: starts at or beyond max_epochs (1000)" in capsys.readouterr().err
    fits = _config(tmp_path, trainer, ["{name: kd, start_epoch: 0, end_epoch: 1}", "{name: ft, start_epoch: 1}"])
    assert main(["show", str(fits)]) == 0
    assert "2 stages over 1000 epochs (kd [0, 1), ft [1, 1000))" in capsys.readouterr().out


def test_a_step_schedule_of_an_unknown_model_ends_at_max_steps(tmp_path, capsys):
    config = _config(tmp_path, "  max_steps: 3000\n  max_epochs: -1\n",
                     ["{name: distill, start_step: 0, end_step: 900, loss_weights: {cls: 0.0}}",
                      "{name: finetune, start_step: 900}"])  # a weight of the module's (unknown here)
    assert main(["show", str(config)]) == 0
    out = capsys.readouterr().out
    assert "2 stages over 3000 steps (distill [0, 900), finetune [900, 3000))" in out and "end)" not in out


@pytest.mark.parametrize(("content", "reason"), [(b"", "EOFError"), (b"hello\n", "KeyError")])
def test_show_of_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys, content, reason):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    assert main(["show", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cannot read checkpoint '{path}': {reason}") and len(err.strip().splitlines()) == 1, err


def test_model_beside_a_configs_own_class_path_is_refused_not_ignored(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  class_path: conftest.PlainStudent\ntrainer:\n  max_epochs: 2\n")
    assert main(["validate", str(config), "--model", "nonexist.Mod"]) == 2
    assert ("config: `model` = 'nonexist.Mod': the config's model.class_path (conftest.PlainStudent) is the class; "
            "`--model` goes with a config that names none") in capsys.readouterr().err


def _seed_of_5_epochs(tmp_path: Path, a_ends: int) -> Path:
    """A schedule file with `train.epochs: 5`: stage `a` up to `a_ends`, then `b`, open (it ends at epoch 5)."""
    seed = tmp_path / "seed5.json"
    seed.write_text('{"train": {"epochs": 5, "loss_weights": {"ce": 1.0}}, "stage_schedule": ['
                    f'{{"name": "a", "start_epoch": 0, "end_epoch": {a_ends}}}, {{"name": "b", "start_epoch": {a_ends}}}]}}')
    return seed


def test_a_run_longer_than_the_schedule_files_epochs_trains_the_base_after_them(tmp_path, capsys):
    seed = _seed_of_5_epochs(tmp_path, a_ends=4)
    config = tmp_path / "config.yaml"
    config.write_text(f"trainer:\n  max_epochs: 6\n  callbacks:\n    - class_path: lightning_stages.StageScheduleCallback\n"
                      f"      init_args: {{config: {seed}}}\n")
    expected = "2 stages over 6 epochs (a [0, 4), b [4, 5), base [5, 6))"  # as fit trains it: b ends at train.epochs
    for args in (["show", str(config)], ["show", str(seed), "--max-epochs", "6"]):
        assert main(args) == 0
        assert expected in capsys.readouterr().out


def test_a_stage_that_ends_after_the_run_gets_the_note_fit_warns_with(tmp_path, capsys):
    seed = tmp_path / "cut.json"
    seed.write_text('{"train": {"epochs": 2, "loss_weights": {"a": 1.0}}, "stage_schedule": '
                    '[{"name": "s", "start_epoch": 0, "end_epoch": 5}]}')
    for command in ("show", "validate"):
        assert main([command, str(seed)]) == 0
        assert f"note: {seed}: stage 0 ('s') ends at epoch 5 but the run stops at 2; fit cuts it short" in \
            capsys.readouterr().err


def test_model_naming_the_configs_own_class_is_taken(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  class_path: conftest.PlainStudent\ntrainer:\n  max_epochs: 2\n")
    assert main(["validate", str(config), "--model", "conftest.PlainStudent"]) == 0  # e.g. one --model for many configs


@pytest.mark.parametrize(("model", "code"), [("conftest.PlainStudent", 2), ("conftest.Student", 0)])
def test_validate_refuses_a_distilling_schedule_for_a_model_that_is_no_distillation_module(tmp_path, capsys, model,
                                                                                          code):
    config = tmp_path / "config.yaml"
    config.write_text(CALLBACK.format(trainer="  max_epochs: 2\n", stages="          - {name: kd, start_epoch: 0, "
                                      "end_epoch: 1, distillation: true}") + f"model:\n  class_path: {model}\n")
    assert main(["validate", str(config)]) == code
    if code:  # the message fit gives at setup
        assert ("stage 0 ('kd'): `distillation` = True: distillation is requested but PlainStudent is not a "
                "DistillationModule") in capsys.readouterr().err


def test_a_run_shorter_than_the_schedule_files_epochs_cuts_its_open_stage_at_them(tmp_path, capsys):
    seed = _seed_of_5_epochs(tmp_path, a_ends=3)
    assert main(["show", str(seed), "--max-epochs", "4"]) == 0
    out, err = capsys.readouterr()
    assert "2 stages over 4 epochs (a [0, 3), b [3, 5))" in out  # fit: b ends at train.epochs, cut short at 4
    assert "stage 1 ('b') ends at epoch 5 but the run stops at 4; fit cuts it short" in err


def test_model_naming_the_configs_own_class_by_another_import_path_is_accepted(tmp_path, capsys, monkeypatch):
    (tmp_path / "reexports_student.py").write_text("from conftest import PlainStudent\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  class_path: conftest.PlainStudent\ntrainer:\n  max_epochs: 2\n")
    assert main(["validate", str(config), "--model", "reexports_student.PlainStudent"]) == 0, capsys.readouterr().err
    assert main(["validate", str(config), "--model", "reexports_student.Other"]) == 2  # not importable: refused
    assert "is the class; `--model` goes with a config that names none" in capsys.readouterr().err


@pytest.mark.parametrize("averaging", ["lightning.pytorch.callbacks.EMAWeightAveraging", "EMAWeightAveraging"])
@pytest.mark.parametrize("no_import", [[], ["--no-import"]])
def test_restore_best_beside_an_averaging_callback_is_refused_by_validate_as_by_fit(tmp_path, capsys, averaging,
                                                                                     no_import):
    stages = ["{name: ft, start_epoch: 0, end_epoch: 2, monitor: val_loss, restore_best: true}"]
    config = _config(tmp_path, "  max_epochs: 4\n", stages)
    assert main(["validate", str(config), *no_import]) == 0, capsys.readouterr().err
    with config.open("a") as file:
        file.write(f"    - class_path: {averaging}\n")
    assert main(["validate", str(config), *no_import]) == 2
    assert ("stage 0 ('ft'): `restore_best` = True: cannot be used beside EMAWeightAveraging: validation scores the "
            "averaged weights") in capsys.readouterr().err


def test_an_averaging_callback_without_restore_best_stages_is_accepted(tmp_path, capsys):
    config = _config(tmp_path, "  max_epochs: 4\n", ["{name: ft, start_epoch: 0, end_epoch: 2}"])
    with config.open("a") as file:
        file.write("    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging\n")
    assert main(["validate", str(config)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("no_import", [[], ["--no-import"]])
def test_restore_best_beside_stochastic_weight_averaging_is_refused_by_validate_as_by_fit(tmp_path, capsys,
                                                                                         no_import):
    config = _config(tmp_path, "  max_epochs: 4\n",
                     ["{name: ft, start_epoch: 0, end_epoch: 2, monitor: val_loss, restore_best: true}"])
    with config.open("a") as file:
        file.write("    - class_path: lightning.pytorch.callbacks.StochasticWeightAveraging\n"
                   "      init_args: {swa_lrs: 0.01}\n")
    assert main(["validate", str(config), *no_import]) == 2
    assert ("stage 0 ('ft'): `restore_best` = True: cannot be used beside StochasticWeightAveraging: it puts its "
            "averaged weights in place of the stage's restored best at the end of the fit") in capsys.readouterr().err


@pytest.mark.parametrize(("verbose", "refused"), [("maybe", True), ("'true'", False), ("false", False), ("2", True)])
def test_a_verbose_that_is_no_flag_is_refused_by_validate_as_by_the_cli(tmp_path, capsys, verbose, refused):
    config = _config(tmp_path, "  max_epochs: 4\n", ["{name: kd, start_epoch: 0, end_epoch: 2}"])
    config.write_text(config.read_text() + f"        verbose: {verbose}\n")
    assert main(["validate", str(config)]) == (2 if refused else 0)
    if refused:
        assert "`verbose` = " in capsys.readouterr().err


PRESETS = '''
from lightning_stages import StageScheduleCallback

PRESETS = {"kd_then_ft": [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True},
                          {"name": "ft", "start_epoch": 2}]}


class PresetStages(StageScheduleCallback):
    def __init__(self, preset: str = "kd_then_ft", lambda_coef: float = 1.0, verbose: bool = True) -> None:
        super().__init__(stage_schedule=PRESETS[preset], lambda_coef=lambda_coef, verbose=verbose)
'''


def _preset_config(tmp_path: Path, monkeypatch, init_args: str) -> Path:
    (tmp_path / "preset_callbacks.py").write_text(PRESETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "config.yaml"
    config.write_text("trainer:\n  max_epochs: 4\n  callbacks:\n    - class_path: preset_callbacks.PresetStages\n"
                      f"      init_args: {init_args}\n")
    return config


def test_a_callback_subclass_is_checked_as_built_from_its_own_arguments(tmp_path, capsys, monkeypatch):
    config = _preset_config(tmp_path, monkeypatch, "{preset: kd_then_ft, lambda_coef: 0.3}")
    assert main(["show", str(config)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "2 stages over 4 epochs (kd [0, 2), ft [2, 4))" in out and "0.3" in out, out
    config = _preset_config(tmp_path, monkeypatch, "{preset: nothing}")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "trainer.callbacks[0] (PresetStages): `init_args` = " in err and "KeyError: 'nothing'" in err, err
    config = _preset_config(tmp_path, monkeypatch, "{lambda_coef: -1}")  # the library's own check, as fit makes it
    assert main(["validate", str(config)]) == 2
    assert "`lambda_coef` = -1" in capsys.readouterr().err


def _stages_key_config(tmp_path: Path, lambda_coef: float, callback: bool = False) -> Path:
    seed = tmp_path / "stages.json"
    seed.write_text('{"stage_schedule": [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": true, '
                    f'"lambda_coef": {lambda_coef}}}, {{"name": "ft", "start_epoch": 1}}]}}')
    config = _config(tmp_path, "  max_epochs: 4\n", ["{name: a, start_epoch: 0}"]) if callback else (
        tmp_path / "config.yaml")
    if not callback:
        config.write_text("trainer:\n  max_epochs: 4\n")
    config.write_text(config.read_text() + f"stages: {seed}\n")  # StagesLightningCLI's --stages, set in the file
    return config


def test_a_stages_key_in_the_config_file_is_the_schedule_validate_and_show_check(tmp_path, capsys):
    assert main(["show", str(_stages_key_config(tmp_path, 0.5))]) == 0
    assert "2 stages over 4 epochs (kd [0, 1), ft [1, 4))" in capsys.readouterr().out
    assert main(["validate", str(_stages_key_config(tmp_path, -1))]) == 2
    assert "`lambda_coef` = -1" in capsys.readouterr().err
    assert main(["validate", str(_stages_key_config(tmp_path, 0.5, callback=True))]) == 2
    assert "the config already has a StageScheduleCallback in trainer.callbacks" in capsys.readouterr().err


def test_stages_lightning_cli_checks_a_stages_key_in_a_config_file_before_parsing(tmp_path):
    from lightning_stages.cli import StagesLightningCLI
    from lightning_stages.errors import StageConfigError

    config = _stages_key_config(tmp_path, -1)
    with pytest.raises(StageConfigError, match="`lambda_coef` = -1"):
        StagesLightningCLI(args=["--config", str(config)], run=False)


def test_a_model_section_in_a_file_of_its_own_is_read_as_fit_reads_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny_declares.py").write_text(
        "import lightning.pytorch as pl\n\n\nclass Tiny(pl.LightningModule):\n    def __init__(self):\n"
        "        super().__init__()\n        self.loss_weights = {'ce': 1.0, 'l2': 1.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "model.yaml").write_text("class_path: tiny_declares.Tiny\n")
    config = _config(tmp_path, "  max_epochs: 4\n", ["{name: ft, start_epoch: 0, loss_weights: {cee: 0.0}}"])
    config.write_text(config.read_text() + "model: model.yaml\n")
    assert main(["validate", str(config)]) == 2  # before: a note that the config names no model class, and OK
    err = capsys.readouterr().err
    assert "`loss_weights.cee`" in err and "did you mean `ce`?" in err, err


def test_a_run_longer_than_a_schedule_files_own_length_warns_about_the_tail():
    from lightning_stages.schedule import StageSchedule
    from lightning_stages.stage_reports import warn_about_coverage

    epochs = StageSchedule([{"name": "kd", "start_epoch": 0, "end_epoch": 1}, {"name": "ft", "start_epoch": 1}],
                           total_epochs=2)  # a seed file's train.epochs: 2, in a run of max_epochs=4
    with pytest.warns(UserWarning, match=r"no stage covers epochs \[2, 4\); they run with the base settings"):
        warn_about_coverage(epochs, 4)
    steps = StageSchedule([{"name": "kd", "start_step": 0, "end_step": 3}, {"name": "ft", "start_step": 3}],
                          total_steps=6)
    with pytest.warns(UserWarning, match=r"no stage covers steps \[6, 10\)"):
        warn_about_coverage(steps, 10)


def test_show_of_a_step_schedule_file_in_a_longer_run_shows_the_base_after_it(tmp_path, capsys):
    seed = tmp_path / "steps.json"
    seed.write_text('{"train": {"max_steps": 6}, "stage_schedule": [{"name": "kd", "start_step": 0, "end_step": 3}, '
                    '{"name": "ft", "start_step": 3}]}')
    config = tmp_path / "config.yaml"
    config.write_text("trainer:\n  max_steps: 10\n  max_epochs: -1\n")
    assert main(["show", str(config), "--stages", str(seed)]) == 0
    out = capsys.readouterr().out
    assert "(kd [0, 3), ft [3, 6), base [6, 10))" in out, out


def test_a_misspelt_argument_of_a_callback_subclass_gets_a_did_you_mean(tmp_path, capsys, monkeypatch):
    config = _preset_config(tmp_path, monkeypatch, "{prest: kd_then_ft}")
    assert main(["validate", str(config)]) == 2
    assert ("trainer.callbacks[0] (PresetStages): `prest` = 'kd_then_ft': is not an argument of PresetStages; did "
            "you mean `preset`?") in capsys.readouterr().err
