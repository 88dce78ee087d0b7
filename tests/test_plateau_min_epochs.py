"""A plateau of the run's last stage under ``Trainer(min_epochs=...)`` (``min_steps``): Lightning trains on until its
minimum, as it does after ``EarlyStopping``; the stage goes on with it (its own settings, not the base's) and ends
where the run can stop, its best weights restored there."""

from __future__ import annotations

import pytest
import torch
from conftest import trainer
from test_adaptive_stages import Scripted, data

from lightning_stages import StageScheduleCallback

FLAT_AFTER_1 = [5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]  # best at epoch 1; a plateau (patience 1) at epoch 2


@pytest.mark.parametrize("restore_best", [False, True])
def test_the_last_stage_runs_until_min_epochs_lets_the_run_stop(tmp_path, restore_best):
    stages = [{"name": "kd", "start_epoch": 0, "distillation": True, "monitor": "val/score", "patience": 1,
               "restore_best": restore_best}]
    model = Scripted(FLAT_AFTER_1)
    fit = trainer(tmp_path, max_epochs=8, min_epochs=5, callbacks=[StageScheduleCallback(stages, verbose=False)])
    fit.fit(model)
    assert model.stage_of == dict.fromkeys(range(5), "kd")  # before: epochs 3 and 4 trained as "base"
    assert fit.current_epoch == 5  # stopped where min_epochs let it, not at max_epochs
    if restore_best:  # the best of the stage (epoch 1's validation) is what the run ends with
        for key, value in model.at_validation[1].items():
            assert torch.equal(model.state_dict()[key], value), key


def test_without_min_epochs_the_plateau_still_stops_the_run_at_once(tmp_path):
    stages = [{"name": "kd", "start_epoch": 0, "distillation": True, "monitor": "val/score", "patience": 1}]
    model = Scripted(FLAT_AFTER_1)
    fit = trainer(tmp_path, max_epochs=8, callbacks=[StageScheduleCallback(stages, verbose=False)])
    fit.fit(model)
    assert model.stage_of == dict.fromkeys(range(3), "kd") and fit.current_epoch == 3


def test_a_step_stage_runs_until_min_steps_lets_the_run_stop(tmp_path):
    stages = [{"name": "kd", "start_step": 0, "distillation": True, "monitor": "val/score", "patience": 1}]
    model = Scripted(FLAT_AFTER_1)  # 2 optimizer steps an epoch; validation at each epoch's end
    fit = trainer(tmp_path, max_epochs=8, min_steps=10, callbacks=[StageScheduleCallback(stages, verbose=False)])
    fit.fit(model)
    assert model.stage_of == dict.fromkeys(range(5), "kd")  # before: steps 6 to 9 (epochs 3, 4) trained as "base"
    assert fit.global_step == 10


class OneLongEpoch(Scripted):
    """6 optimizer steps an epoch (24 samples, batches of 4); each step's stage written down."""

    def __init__(self, script):
        super().__init__(script)
        self.stage_at_step: dict[int, str] = {}

    def train_dataloader(self):
        return data(24, 0)

    def record(self, batch, batch_idx, loss):
        super().record(batch, batch_idx, loss)
        self.stage_at_step[self.global_step] = self.stage_name


def test_min_steps_inside_the_first_epoch_keeps_the_stage_to_the_epochs_end(tmp_path):
    # Lightning sets min_epochs=1 with any min_steps: the run cannot stop before the first epoch ends (step 6)
    stages = [{"name": "kd", "start_step": 0, "distillation": True, "monitor": "val/score", "patience": 1}]
    model = OneLongEpoch([4.0] * 4)  # the same value at every validation: a plateau at the second (step 4)
    fit = trainer(tmp_path, max_epochs=4, max_steps=12, min_steps=4, val_check_interval=2,
                  callbacks=[StageScheduleCallback(stages, verbose=False)])
    fit.fit(model)
    assert model.stage_at_step == dict.fromkeys(range(6), "kd")  # before: steps 4 and 5 trained as "base"
    assert fit.global_step == 6


def test_min_steps_in_an_epoch_schedule_keeps_the_stage_until_those_steps(tmp_path):
    stages = [{"name": "kd", "start_epoch": 0, "distillation": True, "monitor": "val/score", "patience": 1}]
    model = Scripted(FLAT_AFTER_1)  # 2 optimizer steps an epoch; a plateau at epoch 2
    fit = trainer(tmp_path, max_epochs=8, min_steps=9, callbacks=[StageScheduleCallback(stages, verbose=False)])
    fit.fit(model)
    assert model.stage_of == dict.fromkeys(range(5), "kd")  # 9 steps: 5 epochs of 2; before: epochs 3, 4 "base"
    assert fit.current_epoch == 5
