"""bind_schedule: the schedule with every base setting filled from what the module declares and the run's length."""

from __future__ import annotations

import copy

import pytest

from lightning_stages import StageConfigError, StageSchedule
from lightning_stages.schedule import bind_schedule
from lightning_stages.schedule.bind import given_schedule

WEIGHTS = {"bce": 1.0, "dice": 2.0}
KD_THEN_FINETUNE = [
    {"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True, "loss_weights": {"bce": 0}},
    {"name": "finetune", "start_epoch": 3, "lambda_coef": 0.0},
]


def rows(schedule: StageSchedule) -> list[tuple]:
    return [(r.name, r.start_epoch, r.end_epoch, r.distillation, r.lambda_coef, r.loss_weights)
            for r in schedule.timeline()]


def test_declared_weights_overridden_key_by_key_and_open_stages_end_with_the_run():
    bound = bind_schedule(StageSchedule(KD_THEN_FINETUNE),
                          declared={"loss_weights": WEIGHTS, "distillation": False, "lambda_coef": 0.5},
                          weight_overrides={"dice": 3.0}, max_epochs=5)
    assert rows(bound) == [
        ("kd", 0, 2, True, 0.5, {"bce": 0.0, "dice": 3.0}),
        ("base", 2, 3, False, 0.5, {"bce": 1.0, "dice": 3.0}),
        ("finetune", 3, 5, False, 0.0, {"bce": 1.0, "dice": 3.0}),
    ]
    assert bound.loss_weights == {"bce": 1.0, "dice": 3.0}
    assert bound.total_epochs == 5


def test_the_schedule_base_wins_over_the_declared_one_and_overrides_win_over_the_schedule_weights():
    schedule = StageSchedule([{"start_epoch": 0}], loss_weights={"bce": 4.0, "dice": 5.0}, distillation=True,
                             lambda_coef=0.25, total_epochs=2)
    bound = bind_schedule(schedule, declared={"loss_weights": WEIGHTS, "distillation": False, "lambda_coef": 9.0},
                          weight_overrides={"bce": 7.0}, max_epochs=10)
    assert rows(bound) == [("stage_0", 0, 2, True, 0.25, {"bce": 7.0, "dice": 5.0})]
    assert bound.total_epochs == 2  # the schedule's own total is kept; max_epochs only checks


def test_nothing_declared_takes_the_defaults_and_the_overrides_as_the_whole_base():
    bound = bind_schedule(StageSchedule([{"start_epoch": 1, "loss_weights": {"cls": 0.5}}]),
                          weight_overrides={"cls": 1.0}, max_epochs=3)
    assert rows(bound) == [("base", 0, 1, False, 1.0, {"cls": 1.0}), ("stage_0", 1, 3, False, 1.0, {"cls": 0.5})]


def test_declared_values_of_the_wrong_type_count_as_not_declared():
    bound = bind_schedule(StageSchedule(), declared={"loss_weights": ["bce"], "distillation": "yes",
                                                     "lambda_coef": True})
    assert rows(bound) == [("base", 0, None, False, 1.0, {})]


def test_every_binding_problem_is_raised_together():
    schedule = StageSchedule([
        {"name": "kd", "start_epoch": 0, "end_epoch": 2, "loss_weights": {"bec": 0}},
        {"name": "late", "start_epoch": 6},
    ])
    with pytest.raises(StageConfigError) as info:
        bind_schedule(schedule, declared={"loss_weights": WEIGHTS, "lambda_coef": -1.0},
                      weight_overrides={"dcie": 1.0}, max_epochs=6)
    assert [str(p) for p in info.value.problems] == [
        "base: `loss_weights.dcie` = 1.0: is not a task loss of this module; did you mean `dice`?",
        "base: `lambda_coef` = -1.0: must be >= 0",
        "stage 0 ('kd'): `loss_weights.bec` = 0: is not a task loss of this module; did you mean `bce`?",
        "stage 1 ('late'): `start_epoch` = 6: starts at or beyond max_epochs (6), so it would never run",
    ]


def test_without_base_weights_every_stage_must_name_every_weight():
    schedule = StageSchedule([{"start_epoch": 0, "end_epoch": 1, "loss_weights": {"bce": 1}}, {"start_epoch": 1}])
    with pytest.raises(StageConfigError, match=r"stage 1: `loss_weights.bce` = None: is not set and has no base"):
        bind_schedule(schedule)
    assert rows(bind_schedule(schedule, declared={"loss_weights": {"bce": 2}}, max_epochs=2)) == [
        ("stage_0", 0, 1, False, 1.0, {"bce": 1.0}), ("stage_1", 1, 2, False, 1.0, {"bce": 2.0})]


def test_binding_changes_none_of_its_inputs():
    schedule = StageSchedule(KD_THEN_FINETUNE)
    before = copy.deepcopy(schedule)
    declared = {"loss_weights": dict(WEIGHTS)}
    overrides = {"dice": 3.0}
    bind_schedule(schedule, declared=declared, weight_overrides=overrides, max_epochs=5)
    assert schedule == before
    assert declared == {"loss_weights": WEIGHTS}
    assert overrides == {"dice": 3.0}


def test_given_schedule_reads_a_seed_config_and_keeps_the_weights_apart(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"train": {"epochs": 4, "loss_weights": {"bce": 1}}, // the base\n'
                    ' "stage_schedule": [{"start_epoch": 0, "loss_weights": {"bce": 0}}]}')
    schedule, overrides = given_schedule(config=path, lambda_coef=0.5)
    assert (schedule.loss_weights, schedule.lambda_coef, schedule.total_epochs, overrides) == (None, 0.5, 4,
                                                                                            {"bce": 1})
    assert rows(bind_schedule(schedule, weight_overrides=overrides)) == [("stage_0", 0, 4, False, 0.5, {"bce": 0.0})]
    with pytest.raises(StageConfigError, match="either `stage_schedule` or `config`"):
        given_schedule([], config=path)
