"""StageScheduleCallback configured from a LightningCLI YAML file, validated by the CLI's parser."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import FIVE_WEIGHTS, Student, loader
from lightning.pytorch.cli import LightningCLI

from lightning_stages import Stage, StageScheduleCallback

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false"]


def stage_callback(cli: LightningCLI) -> StageScheduleCallback:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, StageScheduleCallback)]
    return callback


@pytest.mark.parametrize(
    ("name", "first", "second"),
    [("seed_distill_finetune.yaml", "distill_only", "finetune_only"),
     ("seed_finetune_distill.yaml", "finetune_first", "distill_second")],
)
def test_seed_yaml_configs_build_the_callback(name, first, second):
    cli = LightningCLI(Student, run=False, args=["--config", str(CONFIGS / name), *QUIET])
    callback = stage_callback(cli)
    assert all(isinstance(s, Stage) for s in callback.schedule.stages)
    assert [s.name for s in callback.schedule.stages] == [first, second]
    assert callback.base_loss_weights == FIVE_WEIGHTS
    # the YAML and the seed-format JSON describe the same schedule
    json_callback = StageScheduleCallback(config=str(CONFIGS / name.replace(".yaml", ".json")))
    assert json_callback.schedule.stages == callback.schedule.stages


def test_yaml_callback_trains(tmp_path):
    cli = LightningCLI(
        Student, run=False, args=["--config", str(CONFIGS / "seed_distill_finetune.yaml"), *QUIET,
                                  "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"],
    )
    cli.trainer.fit(cli.model, loader())
    assert {row[1] for row in cli.model.seen} == {"distill_only"}
    assert cli.model.teacher_builds == 1


def test_the_cli_parser_rejects_a_misspelt_stage_key(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "seed_distill_finetune.yaml").read_text())
    stage = config["trainer"]["callbacks"][0]["init_args"]["stage_schedule"][1]
    stage["lamda_coef"] = stage.pop("lambda_coef")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        LightningCLI(Student, run=False, args=["--config", str(path), *QUIET])
    assert info.value.code != 0
    assert "lamda_coef" in capsys.readouterr().err


def test_the_cli_parser_rejects_a_wrong_type(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "seed_distill_finetune.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["stage_schedule"][0]["start_epoch"] = "zero"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        LightningCLI(Student, run=False, args=["--config", str(path), *QUIET])
    assert "start_epoch" in capsys.readouterr().err
