"""What the callback checkpoints is plain Python, and damaged state never stops a resume.

A schedule built from numpy numbers (``np.linspace(...)[i]``, ``np.int64`` epochs, a pandas-like row, ``np.str_``
loss names) holds plain ``int``/``float``/``bool``/``str``, so every checkpoint loads with
``torch.load(weights_only=True)``, as Lightning loads it.
A checkpoint whose saved schedule is damaged (``null``, a list, a string, garbage) resumes with a warning and the
schedule given now; a string there is never opened as a file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyNet, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import Stage, StageSchedule, StageScheduleCallback
from lightning_stages.schedule import seed_format


def tiny_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)),
                      batch_size=4)


def numpy_stages() -> list:
    lambdas = np.linspace(0.0, 1.0, 3)
    row = {"name": np.str_("joint"), "start_epoch": np.int64(1), "end_epoch": np.int32(2),  # a pandas-like row
           "distillation": np.bool_(True), "lambda_coef": lambdas[1],
           "loss_weights": {np.array(["cls"])[0]: np.float32(0.5)}}  # an np.str_ loss name
    return [Stage(name="kd", start_epoch=np.int64(0), end_epoch=np.int64(1), distillation=True,
                  lambda_coef=lambdas[2]), row]


def _types(value) -> set[str]:
    if isinstance(value, dict):  # keys and values
        return set().union(*(_types(k) | _types(v) for k, v in value.items())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_types(v) for v in value)) if value else set()
    return {type(value).__module__ + "." + type(value).__name__}


def test_numpy_numbers_become_plain_python_in_the_schedule():
    schedule = StageSchedule(numpy_stages(), loss_weights={"cls": np.float64(1.0)}, lambda_coef=np.float16(2.0),
                             total_epochs=np.int64(3))
    assert _types(schedule.to_dict()) <= {"builtins.int", "builtins.float", "builtins.bool", "builtins.str"}
    assert type(schedule.stages[1].lambda_coef) is float and schedule.stages[1].lambda_coef == 0.5
    assert type(schedule.stages[0].start_epoch) is int and type(schedule.total_epochs) is int
    assert schedule.at(1).loss_weights == {"cls": 0.5} and schedule.at(2).lambda_coef == 2.0


def test_a_numpy_schedule_checkpoint_loads_with_weights_only_and_resumes(tmp_path: Path):
    class Module(TinyNet):
        def __init__(self):
            super().__init__()
            self.lambda_coef = np.float64(0.25)  # the module's declared base, numpy too
            self.loss_weights = {np.str_("cls"): np.float64(1.0)}

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    run = trainer(tmp_path, max_epochs=3, callbacks=[StageScheduleCallback(numpy_stages()), checkpoints],
                  enable_checkpointing=True)
    run.fit(Module(), tiny_loader())
    state = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)  # raised UnpicklingError before
    saved = state["callbacks"]["StageScheduleCallback"]["schedule"]
    assert saved["stage_schedule"][1] == {"name": "joint", "start_epoch": 1, "end_epoch": 2, "distillation": True,
                                          "lambda_coef": 0.5, "loss_weights": {"cls": 0.5}}
    assert saved["distillation"]["lambda_coef"] == 0.25
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = trainer(tmp_path / "resumed", max_epochs=3, callbacks=[StageScheduleCallback(numpy_stages())])
        resumed.fit(Module(), tiny_loader(), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert resumed.current_epoch == 3
    read = [str(w.message) for w in caught if "differs" in str(w.message) or "could not be read" in str(w.message)]
    assert read == []  # read, and the same schedule


DAMAGED = {
    "null": None,
    "a list": [1, 2],
    "a number": 5,
    "garbage mapping": {"stage_schedule": [{"start_epoch": "x", "loss_weights": {1: 2}}], "train": "y"},
    "huge number": {"distillation": {"lambda_coef": 10**400}},
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_state_warns_and_keeps_the_schedule_given_now(damage: str):
    callback = StageScheduleCallback([{"name": "a", "start_epoch": 0, "end_epoch": 2}])
    before = callback.schedule
    with pytest.warns(UserWarning, match="(?s)could not be read .*resuming with the schedule given now"):
        callback.load_state_dict({"schedule": DAMAGED[damage]})
    assert callback.schedule is before


def test_a_damaged_state_that_is_not_even_a_mapping_warns():
    callback = StageScheduleCallback()
    with pytest.warns(UserWarning, match="could not be read"):
        callback.load_state_dict("state")  # type: ignore[arg-type]


def test_a_string_in_the_state_is_never_opened_as_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A crafted checkpoint naming a readable config: reading it would warn that the schedule *differs*."""
    other = tmp_path / "other.json"
    other.write_text('{"stage_schedule": [{"name": "other", "start_epoch": 0}]}')
    opened = []
    real = seed_format.load_config
    monkeypatch.setattr(seed_format, "load_config", lambda path: opened.append(path) or real(path))
    callback = StageScheduleCallback([{"name": "a", "start_epoch": 0}])
    with pytest.warns(UserWarning) as caught:
        callback.load_state_dict({"schedule": str(other)})
    assert opened == []
    assert [str(w.message) for w in caught if "differs" in str(w.message)] == []
    assert any("could not be read" in str(w.message) and "not a mapping" in str(w.message) for w in caught)


TWO_STAGES = [{"name": "a", "start_epoch": 0, "end_epoch": 1}, {"name": "b", "start_epoch": 1}]


def _resume_damaged(tmp_path: Path, damage, match: str) -> TinyNet:
    """A fit of stage ``a`` saved to ``last.ckpt``, its callback state changed by ``damage(state)``, resumed into ``b``
    with a warning matching ``match``."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_epochs=1, callbacks=[StageScheduleCallback([TWO_STAGES[0]]), checkpoints],
            enable_checkpointing=True).fit(TinyNet(), tiny_loader())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    damage(state["callbacks"])
    torch.save(state, tmp_path / "damaged.ckpt")
    model = TinyNet()
    with pytest.warns(UserWarning, match=match):
        trainer(tmp_path / "resumed", max_epochs=2, callbacks=[StageScheduleCallback(TWO_STAGES)]).fit(
            model, tiny_loader(), ckpt_path=tmp_path / "damaged.ckpt")
    return model


def test_a_damaged_checkpoint_resumes_a_fit_with_a_warning(tmp_path: Path):
    model = _resume_damaged(tmp_path, lambda states: states["StageScheduleCallback"].__setitem__("schedule", None),
                            "could not be read")
    assert model.stage_name == "b"


@pytest.mark.parametrize("state", [None, {}, [], 0, ""], ids=["null", "empty mapping", "empty list", "zero", "empty"])
def test_an_empty_or_zero_callback_state_resumes_a_fit_with_a_warning(tmp_path: Path, state):
    # Lightning hands no empty or zero state to load_state_dict: such a damaged state resumed without a word
    model = _resume_damaged(tmp_path, lambda states: states.__setitem__("StageScheduleCallback", state),
                            "(?s)could not be read .*resuming with the schedule given now")
    assert model.stage_name == "b"
