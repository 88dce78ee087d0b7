"""Ramps of an epoch schedule in real fits: a ``ramp_steps`` stage that spans several epochs, and an ``ramp_epochs``
stage whose own ``data`` has another number of batches than the stage before (the values follow the README's
formulas, the same in a run resumed at the boundary)."""

from __future__ import annotations

import pytest
import torch
from conftest import EpochShuffle, ResumableLoader, TinyNet, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from lightning_stages import StageConfigError, StageScheduleCallback


class Recorded(TinyNet):
    """Writes down, per training batch, (epoch, batch, distillation, lambda_coef, the `cls` weight); its loader has
    ``sizes[stage_data]`` samples, 4 a batch."""

    def __init__(self, sizes: dict) -> None:
        super().__init__()
        self.sizes, self.rows = sizes, []

    def record(self, batch, batch_idx, loss):
        self.rows.append((self.current_epoch, batch_idx, self.use_distillation, self.lambda_coef,
                          self.loss_weights["cls"]))

    def train_dataloader(self):
        n = self.sizes[getattr(self, "stage_data", None)]
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
        return ResumableLoader(data, batch_size=4, sampler=EpochShuffle(n))


def expected_ramp(p: float) -> tuple[bool, float, float]:
    """kd (distilling, `cls` weight 0) ramped linearly into ft (not distilling, `cls` 1): while ramping the
    distillation stays on with lambda 1 - p, and `cls` is p; from p = 1 on, ft's own values."""
    return (True, pytest.approx(1 - p), pytest.approx(p)) if p < 1 else (False, 1.0, 1.0)


def test_a_ramp_steps_stage_of_an_epoch_schedule_ramps_across_epochs(tmp_path):
    """It raised ValueError ('the ramp of this stage needs `batches_per_epoch`') at the end of its second epoch."""
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True, "loss_weights": {"cls": 0.0}},
              {"name": "ft", "start_epoch": 1, "end_epoch": 4, "distillation": False, "ramp_steps": 6}]
    model = Recorded({None: 16})  # 4 batches an epoch
    trainer(tmp_path, max_epochs=4, callbacks=[StageScheduleCallback(stage_schedule=stages, verbose=False)]).fit(model)
    assert len(model.rows) == 16
    for epoch, batch, *values in model.rows[4:]:  # ft: p = optimizer steps since its first batch / 6
        assert tuple(values) == expected_ramp((4 * (epoch - 1) + batch) / 6), (epoch, batch)


STAGES_WITH_DATA = [
    {"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True, "loss_weights": {"cls": 0.0}, "data": "big"},
    {"name": "ft", "start_epoch": 1, "end_epoch": 3, "distillation": False, "ramp_epochs": 1, "data": "small"}]
SIZES = {"big": 32, "small": 8}  # 8 batches, then 2


def _fit(tmp_path, ckpt_path=None, checkpoints=()) -> Recorded:
    model = Recorded(SIZES)
    trainer(tmp_path, max_epochs=3, enable_checkpointing=bool(checkpoints),
            callbacks=[StageScheduleCallback(stage_schedule=STAGES_WITH_DATA, verbose=False), *checkpoints]
            ).fit(model, ckpt_path=ckpt_path)
    return model


def test_an_epoch_ramp_counts_the_batches_of_its_own_stages_data_also_resumed(tmp_path):
    """p = (epoch + batch / num_training_batches - start) / ramp_epochs with this epoch's 2 batches; the first
    loader's 8 were used, and a run resumed at the boundary (whose first loader is ft's) got other values."""
    whole = _fit(tmp_path / "whole", checkpoints=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)])
    ramp = [row for row in whole.rows if row[0] == 1]
    assert [(e, b) for e, b, *_ in ramp] == [(1, 0), (1, 1)]
    for epoch, batch, *values in ramp:
        assert tuple(values) == expected_ramp(batch / 2), (epoch, batch)
    (checkpoint,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    resumed = _fit(tmp_path / "resumed", ckpt_path=checkpoint)
    assert resumed.rows == [row for row in whole.rows if row[0] >= 1]


class Streamed(Recorded):
    """``sizes[stage_data]`` samples as a stream (no length) where ``sizes`` says None."""

    def train_dataloader(self):
        if self.sizes[getattr(self, "stage_data", None)] is not None:
            return super().train_dataloader()

        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                g = torch.Generator().manual_seed(0)
                return iter([(torch.randn(4, generator=g), torch.tensor(1)) for _ in range(8)])

        return torch.utils.data.DataLoader(Stream(), batch_size=4)


def _two_stages(ramp: dict, kd_data: str, ft_data: str) -> list[dict]:
    return [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True, "loss_weights": {"cls": 0.0},
             "data": kd_data},
            {"name": "ft", "start_epoch": 1, "end_epoch": 3, "distillation": False, "data": ft_data, **ramp}]


def test_an_epoch_ramp_is_checked_against_its_own_stages_loader(tmp_path):
    """At the fit's start the ramp was checked against the first loader (kd's): a ramp_steps=6 in a stage of 2 x 8
    steps was refused, one in a stage of 2 x 2 steps passed and never finished, and a stage whose loader has no
    length failed at its second batch. Each is now checked at its stage's first batch, against its loader."""
    long = Recorded({"small": 8, "big": 32})
    callback = StageScheduleCallback(stage_schedule=_two_stages({"ramp_steps": 6}, "small", "big"), verbose=False)
    trainer(tmp_path / "long", max_epochs=3, callbacks=[callback]).fit(long)
    for epoch, batch, *values in long.rows[2:]:  # ft: 8 batches an epoch
        assert tuple(values) == expected_ramp((8 * (epoch - 1) + batch) / 6), (epoch, batch)

    short = Recorded({"small": 8, "big": 32})
    callback = StageScheduleCallback(stage_schedule=_two_stages({"ramp_steps": 6}, "big", "small"), verbose=False)
    with pytest.raises(StageConfigError, match=r"stage 1 \('ft'\): `ramp_steps` = 6: is longer than the stage \(4 "
                                               r"steps: 2 epochs of 2 optimizer steps\)"):
        trainer(tmp_path / "short", max_epochs=3, callbacks=[callback]).fit(short)
    assert {epoch for epoch, *_ in short.rows} == {0}  # before ft's first batch

    stream = Streamed({"big": 32, "stream": None})
    callback = StageScheduleCallback(stage_schedule=_two_stages({"ramp_epochs": 1}, "big", "stream"), verbose=False)
    with pytest.raises(StageConfigError, match=r"stage 1 \('ft'\): `ramp_epochs` = 1: needs the number of batches per "
                                               "epoch, but the training loader has no length"):
        trainer(tmp_path / "stream", max_epochs=3, callbacks=[callback]).fit(stream)
    assert {epoch for epoch, *_ in stream.rows} == {0}
