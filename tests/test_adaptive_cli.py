"""Adaptive stages at the command line and in LightningCLI YAML: ``show`` marks plateau stages "up to" their cap,
``show --checkpoint`` prints the transitions a run took, and the YAML parser types and checks the new fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import PlainStudent, TinyNet, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import Stage, StageScheduleCallback
from lightning_stages.cli.main import main

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false"]
STAGES = [
    {"name": "distill", "start_epoch": 0, "end_epoch": 6, "distillation": True, "monitor": "val/score", "mode": "min",
     "patience": 1, "min_delta": 0.0, "min_epochs": 2, "restore_best": True, "data": "unlabelled"},
    {"name": "finetune", "start_epoch": 6, "data": "labelled"},
]


def test_show_marks_a_plateau_stage_up_to_its_cap(tmp_path, capsys):
    path = tmp_path / "seed.json"
    path.write_text(json.dumps({"stage_schedule": STAGES, "train": {"epochs": 9}}))
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(distill [0, up to 6), finetune [up to 6, 9))" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert rows == [["[0,", "up", "to", "6)", "distill", "(1/2)", "on", "1", "unlabelled"],
                    ["[up", "to", "6,", "9)", "finetune", "(2/2)", "off", "1", "labelled"]]
    png = tmp_path / "t.png"
    assert main(["show", str(path), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Scored(TinyNet):
    def train_dataloader(self):
        return DataLoader(TensorDataset(*_xy(8)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*_xy(4)), batch_size=4)

    def validation_step(self, batch, batch_idx):
        self.log("val/score", [3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0][self.current_epoch])


def _xy(n):
    import torch

    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_show_checkpoint_prints_the_transitions_the_run_took(tmp_path, capsys):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, max_epochs=9, enable_checkpointing=True,
            callbacks=[StageScheduleCallback(STAGES, verbose=False), checkpoints]).fit(Scored())
    capsys.readouterr()
    # 2.0 at epoch 2 does not improve on epoch 1: distill ends after epoch 2; finetune starts at 3
    assert main(["show", "--checkpoint", str(tmp_path / "ckpt" / "epoch=8.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "(distill [0, 3), finetune [3, 9))" in out
    assert "stage 0 ('distill'): ended at epoch 3 on a plateau of val/score (cap 6); best 2 at epoch 1" in out
    # in the middle of the stage: its best and the wait so far
    assert main(["show", "--checkpoint", str(tmp_path / "ckpt" / "epoch=1.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "no early end (yet): runs up to 6; best 2 at epoch 1, 0 validation run(s) since" in out
    assert main(["show", "--checkpoint", str(tmp_path / "nope.ckpt")]) == 2


def write_yaml(tmp_path: Path, stages) -> Path:
    config = {"trainer": {"max_epochs": 9, "callbacks": [
        {"class_path": "lightning_stages.StageScheduleCallback",
         "init_args": {"stage_schedule": stages, "best_weights": "file"}}]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_lightning_cli_yaml_builds_adaptive_stages(tmp_path):
    cli = LightningCLI(PlainStudent, run=False, args=["--config", str(write_yaml(tmp_path, STAGES)), *QUIET])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, StageScheduleCallback)]
    assert callback.schedule.stages == tuple(Stage(**stage) for stage in STAGES)
    assert callback.adaptive.best.where == "file"


def test_lightning_cli_yaml_rejects_bad_adaptive_fields(tmp_path, capsys):
    bad_type = [dict(STAGES[0], patience="two"), STAGES[1]]
    with pytest.raises(SystemExit):
        LightningCLI(PlainStudent, run=False, args=["--config", str(write_yaml(tmp_path, bad_type)), *QUIET])
    assert "patience" in capsys.readouterr().err
    bad_value = [dict(STAGES[0], mode="maximum"), STAGES[1]]
    # instantiating the callback raises its StageConfigError, which jsonargparse reports inside its own ValueError
    with pytest.raises(ValueError, match=r"stage 0 \('distill'\): `mode` = 'maximum': must be 'min' or 'max'; did "
                                         r"you mean `max`\?"):
        LightningCLI(PlainStudent, run=False, args=["--config", str(write_yaml(tmp_path, bad_value)), *QUIET])
