"""`lightning-stages validate/show` read the loss weights a module declares in ``__init__`` the way ``fit`` reads them
(issue 9): class-path configs, ``LightningCLI(MyModel, MyData)`` configs with ``--model``, and the did-you-mean."""

from __future__ import annotations

import sys
import textwrap

import pytest
import yaml
from conftest import trainer

from lightning_stages import StageConfigError, StageScheduleCallback
from lightning_stages.cli import main

# the README's 20-line example: the module declares its task losses in __init__ and loads its teacher only when asked
MODELS = '''
import lightning.pytorch as pl
import torch
from torch import nn
from lightning_stages import DistillationModule


class MyModel(DistillationModule, pl.LightningModule):
    def __init__(self, hidden: int = 4):
        super().__init__()
        self.net = nn.Linear(6, hidden)
        self.loss_weights = {"ce": 1.0, "aux": 0.5}

    def training_step(self, batch, batch_idx):
        return self.net(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 6), batch_size=2)

    def configure_teachers(self):
        raise RuntimeError("configure_teachers must not run without training")


class NeedsFiles(MyModel):
    def __init__(self, path: str = "weights.pt", loss_weights: dict = None):
        super().__init__()
        raise FileNotFoundError(path)


class MyData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 4):
        super().__init__()
'''

STAGES = [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True, "loss_weights": {"ce": 0.0}},
          {"name": "ft", "start_epoch": 2, "distillation": False}]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project: ``my_models.py`` importable from the working directory, as with ``python -m``."""
    (tmp_path / "my_models.py").write_text(textwrap.dedent(MODELS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_models", None)


def config(path, model: dict, stages=STAGES):
    callback = {"class_path": "lightning_stages.StageScheduleCallback", "init_args": {"stage_schedule": stages}}
    path.write_text(yaml.safe_dump({"trainer": {"max_epochs": 4, "callbacks": [callback]}, "model": model}))
    return str(path)


def test_validate_and_show_read_the_weights_a_module_declares_in_init(project, capsys):
    path = config(project / "run.yaml", {"class_path": "my_models.MyModel", "init_args": {"hidden": 8}})
    assert main(["validate", path]) == 0
    assert main(["show", path]) == 0
    out = capsys.readouterr()
    assert f"OK {path}: 2 stages over 4 epochs (kd [0, 2), ft [2, 4)); teachers needed" in out.out
    table = out.out.splitlines()
    assert table[-3].split() == ["epochs", "stage", "distillation", "lambda", "ce", "aux"]
    assert table[-2].split() == ["[0,", "2)", "kd", "(1/2)", "on", "1", "0", "0.5"]  # aux keeps its declared 0.5
    assert table[-1].split() == ["[2,", "4)", "ft", "(2/2)", "off", "1", "1", "0.5"]
    assert "configure_teachers" not in out.err and out.err == ""


def fit_message(project, stages) -> str:
    """What ``fit`` says about the same schedule on the same module."""
    sys.modules.pop("my_models", None)
    from my_models import MyModel

    with pytest.raises(StageConfigError) as err:
        trainer(project, max_epochs=4, callbacks=[StageScheduleCallback(stage_schedule=stages)]).fit(MyModel())
    return str(err.value)


@pytest.mark.parametrize("model", [{"class_path": "my_models.MyModel"}, {"hidden": 8}])
def test_a_misspelt_weight_gets_the_same_did_you_mean_as_fit(project, capsys, model):
    stages = [{**STAGES[0], "loss_weights": {"cee": 0.0}}, STAGES[1]]
    path = config(project / "run.yaml", model, stages)
    args = [] if "class_path" in model else ["--model", "my_models.MyModel"]  # a LightningCLI(MyModel, MyData) config
    assert main(["validate", path, *args]) == 2
    err = capsys.readouterr().err
    expected = fit_message(project, stages)
    assert "`loss_weights.cee` = 0.0: is not a task loss of this module; did you mean `ce`?" in expected
    assert err.strip() == f"{path}: {expected}"


def test_a_config_without_model_class_is_checked_except_the_declared_weights_and_says_so(project, capsys):
    path = config(project / "run.yaml", {"hidden": 8})
    assert main(["validate", path]) == 0
    out = capsys.readouterr()
    assert out.err.startswith(f"note: {path}: the config names no model class (`model.class_path`), so the loss "
                              "weights its module sets in __init__ are not known; pass `--model package.module.Class`")
    assert out.out.startswith(f"OK {path}")
    assert main(["show", path]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["[2,", "4)", "ft", "(2/2)", "off", "1", "-"]  # unknown
    bad = config(project / "bad.yaml", {"hidden": 8}, [STAGES[0], {"name": "late", "start_epoch": 9}])
    assert main(["validate", bad]) == 2  # the rest is still checked, and the note still given
    err = capsys.readouterr().err
    assert "stage 1 ('late'): `start_epoch` = 9: starts at or beyond max_epochs (4)" in err
    assert err.startswith(f"note: {bad}: the config names no model class")


def test_a_module_that_cannot_be_built_is_read_from_its_init_args_with_a_note(project, capsys):
    path = config(project / "run.yaml", {"class_path": "my_models.NeedsFiles",
                                         "init_args": {"loss_weights": {"ce": 1.0, "aux": 0.5}}})
    assert main(["validate", path]) == 0
    err = capsys.readouterr().err
    assert f"note: {path}: could not build my_models.NeedsFiles from the config to read the loss weights it declares " \
           "in __init__ (FileNotFoundError: weights.pt); read them from init_args and defaults only" in err


def test_an_unimportable_model_option_is_a_problem_naming_it(project, capsys):
    path = config(project / "run.yaml", {"hidden": 8})
    assert main(["validate", path, "--model", "my_models.MyModle"]) == 2
    assert "`--model` = 'my_models.MyModle': cannot be imported (AttributeError" in capsys.readouterr().err
