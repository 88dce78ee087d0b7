"""`bind_schedule` and `with_total_epochs`, public functions of the schedule wing, name bad arguments instead of
letting a raw exception out, and take numpy numbers as the rest of the schedule does."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lightning_stages import StageConfigError, StageSchedule
from lightning_stages.schedule import bind_schedule


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_steps": "5"}, "base: `max_steps` = '5': must be an integer or None"),
    ({"max_epochs": 2.5}, "base: `max_epochs` = 2.5: must be an integer or None"),
    ({"weight_overrides": [1]}, "base: `loss_weights` = [1]: must be a mapping of task losses to weights"),
])
def test_bind_schedule_names_a_bad_argument(kwargs, message):
    with pytest.raises(StageConfigError, match=re.escape(message)):
        bind_schedule(StageSchedule([{"start_epoch": 0}]), declared={"loss_weights": {"a": 1.0}}, **kwargs)


def test_numpy_numbers_bind_as_python_numbers():
    bound = bind_schedule(StageSchedule([{"name": "s", "start_epoch": 0, "end_epoch": 2}]),
                          declared={"loss_weights": {"a": 1.0}}, weight_overrides={"a": np.float32(2.0)},
                          max_epochs=np.int64(4))
    assert bound.total_epochs == 4 and type(bound.total_epochs) is int
    assert bound.base_loss_weights == {"a": 2.0} and type(bound.base_loss_weights["a"]) is float
    assert StageSchedule([{"start_epoch": 0}]).with_total_epochs(np.int64(5)).timeline()[0].end_epoch == 5
