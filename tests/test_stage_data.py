"""Per-stage training data: ``stage_data`` on the module, and the training dataloader built again exactly where a
stage's ``data`` changes (and a resumed run building the data of the stage it resumes in)."""

from __future__ import annotations

import json
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import PlainStudent, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import Stage, StageConfigError, StageSchedule, StageScheduleCallback

# one whole-dataset batch per epoch; the dataset's size tells which data an epoch trained on
SIZES = {"all": 8, "labelled": 4, None: 6}
SCHEDULE = [
    {"name": "distill", "start_epoch": 0, "end_epoch": 2, "data": "all"},
    {"name": "distill_more", "start_epoch": 2, "end_epoch": 3, "data": "all"},  # a boundary where data stays
    {"name": "finetune", "start_epoch": 3, "end_epoch": 5, "data": "labelled"},
    {"name": "plain", "start_epoch": 5, "end_epoch": 6},  # no data: stage_data is None
]
# the epoch's data, from the schedule as written
EXPECTED = {0: "all", 1: "all", 2: "all", 3: "labelled", 4: "labelled", 5: None}


def dataset(data):
    g = torch.Generator().manual_seed(len(str(data)))
    n = SIZES[data]
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 2, (n,), generator=g))


class DataStudent(PlainStudent):
    """Builds its training data from ``stage_data``; writes down every build and what each epoch trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.builds: list[tuple[int, object]] = []  # (epoch, stage_data) at each train_dataloader() call
        self.trained_on: dict[int, int] = {}  # epoch -> batch size

    def train_dataloader(self):
        self.builds.append((self.trainer.current_epoch, self.stage_data))
        return DataLoader(dataset(self.stage_data), batch_size=100)

    def training_step(self, batch, batch_idx):
        self.trained_on[self.trainer.current_epoch] = batch[0].shape[0]
        return super().training_step(batch, batch_idx)


class DataModuleStudent(PlainStudent):
    def training_step(self, batch, batch_idx):
        self.trained_on = getattr(self, "trained_on", {})
        self.trained_on[self.trainer.current_epoch] = batch[0].shape[0]
        return super().training_step(batch, batch_idx)


class StageDataModule(pl.LightningDataModule):
    """The same, written as a datamodule: it reads the module's ``stage_data``."""

    def __init__(self) -> None:
        super().__init__()
        self.builds: list[tuple[int, object]] = []

    def train_dataloader(self):
        data = self.trainer.lightning_module.stage_data
        self.builds.append((self.trainer.current_epoch, data))
        return DataLoader(dataset(data), batch_size=100)


def test_the_loader_is_built_again_exactly_where_data_changes(tmp_path):
    model = DataStudent()
    trainer(tmp_path, max_epochs=6, callbacks=[StageScheduleCallback(SCHEDULE, verbose=False)]).fit(model)
    # built at the start, then only at epoch 3 ("all" -> "labelled") and 5 ("labelled" -> None), not at epoch 2
    assert model.builds == [(0, "all"), (3, "labelled"), (5, None)]
    assert model.trained_on == {epoch: SIZES[data] for epoch, data in EXPECTED.items()}


def test_a_datamodule_reads_stage_data(tmp_path):
    model, datamodule = DataModuleStudent(), StageDataModule()
    trainer(tmp_path, max_epochs=6, callbacks=[StageScheduleCallback(SCHEDULE, verbose=False)]).fit(
        model, datamodule=datamodule)
    assert datamodule.builds == [(0, "all"), (3, "labelled"), (5, None)]
    assert model.trained_on == {epoch: SIZES[data] for epoch, data in EXPECTED.items()}


def test_no_data_field_no_rebuild(tmp_path):
    model = DataStudent()
    schedule = [{k: v for k, v in stage.items() if k != "data"} for stage in SCHEDULE]
    trainer(tmp_path, max_epochs=6, callbacks=[StageScheduleCallback(schedule, verbose=False)]).fit(model)
    assert model.builds == [(0, None)]


def test_loaders_given_to_fit_with_a_change_of_data_are_refused_before_the_first_batch(tmp_path):
    """Loaders passed to ``fit`` cannot be built again with the new ``stage_data``: refused, not silently kept."""
    model = DataStudent()
    loader = DataLoader(dataset("all"), batch_size=100)
    with pytest.raises(StageConfigError, match=r"stage 2 \('finetune'\): `data` = 'labelled': changes the training "
                                               r"data at epoch 3 \('all' -> 'labelled'\), but the training "
                                               r"dataloaders were given to `fit`"):
        trainer(tmp_path, max_epochs=6, callbacks=[StageScheduleCallback(SCHEDULE, verbose=False)]).fit(
            model, train_dataloaders=loader)
    assert model.trained_on == {}
    same = [dict(stage, data="all") for stage in SCHEDULE]  # no change of data: the given loader is all it needs
    trainer(tmp_path, max_epochs=6, callbacks=[StageScheduleCallback(same, verbose=False)]).fit(
        model, train_dataloaders=loader)
    assert model.trained_on == dict.fromkeys(range(6), SIZES["all"]) and model.builds == []


@pytest.mark.parametrize(("resume_after", "builds"), [
    (1, ["all", "labelled", None]),  # resumes in "all", one epoch before the change
    (2, ["labelled", None]),  # resumes exactly at the change: built once, with "labelled", never with "all"
    (3, ["labelled", None]),  # resumes inside "finetune"
])
def test_a_resumed_run_builds_the_data_of_the_stage_it_resumes_in(tmp_path, resume_after, builds):
    first = DataStudent()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, max_epochs=6, callbacks=[StageScheduleCallback(SCHEDULE, verbose=False), checkpoints],
            enable_checkpointing=True).fit(first)
    resumed = DataStudent()
    trainer(tmp_path, max_epochs=6, callbacks=[StageScheduleCallback(SCHEDULE, verbose=False)]).fit(
        resumed, ckpt_path=tmp_path / "ckpt" / f"epoch={resume_after}.ckpt")
    assert [data for _, data in resumed.builds] == builds
    assert resumed.trained_on == {e: SIZES[d] for e, d in EXPECTED.items() if e > resume_after}


def test_data_must_be_a_string_from_python_and_seed_json(tmp_path):
    with pytest.raises(StageConfigError, match=r"stage 1 \('ft'\): `data` = 3: must be a string"):
        StageScheduleCallback([{"start_epoch": 0, "end_epoch": 1}, Stage(name="ft", start_epoch=1, data=3)])
    path = tmp_path / "seed.json"
    path.write_text(json.dumps({"stage_schedule": [{"name": "kd", "start_epoch": 0, "data": ["all"]}]}))
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\): `data` = \['all'\]: must be a string"):
        StageSchedule.from_config(path)
    assert StageSchedule.from_config({"stage_schedule": [{"start_epoch": 0, "data": "all"}]}).at(0).data == "all"


class _EmptySplit(pl.LightningModule):
    """A module whose 'labelled' split turned out empty."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.loss_weights = {"cls": 1.0}
        self.seen: list[tuple[int, str]] = []
        self.without_data = 12  # samples where a stage gives no data

    def train_dataloader(self):
        n = {"all": 16, "labelled": 0}.get(self.stage_data, self.without_data)
        return DataLoader(TensorDataset(torch.randn(n, 4), torch.zeros(n, dtype=torch.long)), batch_size=4)

    def training_step(self, batch, batch_idx):
        self.seen.append((self.trainer.global_step, self.stage_name))
        return F.cross_entropy(self.lin(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_a_stage_whose_data_has_no_batches_is_named_not_a_silent_end_of_the_fit(tmp_path, unit):
    if unit == "epoch":
        stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "data": "all"},
                  {"name": "ft", "start_epoch": 1, "end_epoch": 2, "data": "labelled"}, {"name": "tail", "start_epoch": 2}]
        limits = {"max_epochs": 4}
    else:
        stages = [{"name": "kd", "start_step": 0, "end_step": 3, "data": "all"},
                  {"name": "ft", "start_step": 3, "end_step": 6, "data": "labelled"}, {"name": "tail", "start_step": 6}]
        limits = {"max_steps": 10, "max_epochs": -1}
    model = _EmptySplit()
    fit = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                     callbacks=[StageScheduleCallback(stages, verbose=False)], **limits)
    with pytest.raises(StageConfigError, match=re.escape("stage 1 ('ft'): `data` = 'labelled': gives a training "
                                                         "dataloader with no batches")):
        fit.fit(model)
    assert {stage for _, stage in model.seen} == {"kd"}  # nothing of ft trained before the error


def test_a_stage_without_data_whose_rebuilt_loader_is_empty_is_named_too(tmp_path):
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "data": "all"}, {"name": "tail", "start_epoch": 1}]
    model = _EmptySplit()
    model.without_data = 0
    fit = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, max_epochs=3,
                     callbacks=[StageScheduleCallback(stages, verbose=False)])
    with pytest.raises(StageConfigError, match=re.escape("stage 1 ('tail'): `data` = None: gives a training "
                                                         "dataloader with no batches")):
        fit.fit(model)
