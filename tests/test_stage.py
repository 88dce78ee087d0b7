"""Stage (one stage as written), its checks, and ResolvedStage (one stage as it applies to an epoch)."""

import dataclasses
import math

import pytest

from lightning_stages import ResolvedStage, Stage, StageProblem
from lightning_stages.schedule.checks import parse_stage, stage_problems


def test_stage_has_the_seed_fields_then_the_step_and_ramp_fields_then_the_adaptive_ones():
    names = [f.name for f in dataclasses.fields(Stage)]
    assert names[:11] == [
        "name", "start_epoch", "end_epoch", "distillation", "lambda_coef", "loss_weights",  # the seed's
        "start_step", "end_step", "ramp_epochs", "ramp_steps", "ramp_shape",  # issue 11
    ]
    # the adaptive stages' fields (issue 12), all optional, come last
    assert names[11:] == ["monitor", "mode", "patience", "min_delta", "min_epochs", "min_steps", "restore_best", "data"]
    stage = Stage(start_epoch=4)
    assert (stage.name, stage.end_epoch, stage.distillation, stage.lambda_coef, stage.loss_weights) == (
        None, None, None, None, None,
    )


def test_stage_is_frozen_and_keyword_only():
    stage = Stage(start_epoch=0, end_epoch=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.start_epoch = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Stage("warm", 0, 3)  # type: ignore[misc]


def test_stage_keeps_its_own_copy_of_the_weights():
    weights = {"bce": 1.0, "focal": 15.0}
    stage = Stage(start_epoch=0, loss_weights=weights)
    weights["bce"] = 99.0
    weights["dice"] = 1.0
    assert stage.loss_weights == {"bce": 1.0, "focal": 15.0}
    out = stage.to_dict()
    out["loss_weights"]["focal"] = -1.0
    assert stage.loss_weights == {"bce": 1.0, "focal": 15.0}


def test_to_dict_leaves_out_omitted_fields():
    assert Stage(start_epoch=3).to_dict() == {"start_epoch": 3}
    full = Stage(name="d", start_epoch=0, end_epoch=100, distillation=True, lambda_coef=1.0,
                 loss_weights={"bce": 0})
    assert full.to_dict() == {"name": "d", "start_epoch": 0, "end_epoch": 100, "distillation": True,
                              "lambda_coef": 1.0, "loss_weights": {"bce": 0}}
    # a False flag and a zero coefficient are values, not omissions
    assert Stage(start_epoch=1, distillation=False, lambda_coef=0.0).to_dict() == {
        "start_epoch": 1, "distillation": False, "lambda_coef": 0.0,
    }


def test_a_correct_stage_has_no_problems():
    stage = Stage(name="ok", start_epoch=0, end_epoch=1, distillation=False, lambda_coef=0,
                  loss_weights={"bce": 0, "focal": 15})
    assert stage_problems(stage, 0) == []


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"start_epoch": "3"}, "start_epoch", "must be an integer, not str"),
        ({"start_epoch": 1.0}, "start_epoch", "must be an integer, not float"),
        ({"start_epoch": True}, "start_epoch", "must be an integer, not bool"),
        ({"start_epoch": -1}, "start_epoch", "must be >= 0"),
        ({"start_epoch": 0, "end_epoch": "10"}, "end_epoch", "must be an integer, not str"),
        ({"start_epoch": 5, "end_epoch": 5}, "end_epoch", "must be greater than `start_epoch` (5)"),
        ({"start_epoch": 5, "end_epoch": 2}, "end_epoch", "must be greater than `start_epoch` (5)"),
        ({"start_epoch": 0, "distillation": "yes"}, "distillation", "must be true or false, not str"),
        ({"start_epoch": 0, "distillation": 1}, "distillation", "must be true or false, not int"),
        ({"start_epoch": 0, "lambda_coef": "0.5"}, "lambda_coef", "must be a number, not str"),
        ({"start_epoch": 0, "lambda_coef": True}, "lambda_coef", "must be a number, not bool"),
        ({"start_epoch": 0, "lambda_coef": -0.1}, "lambda_coef", "must be >= 0"),
        ({"start_epoch": 0, "lambda_coef": math.nan}, "lambda_coef", "must be finite"),
        ({"start_epoch": 0, "lambda_coef": math.inf}, "lambda_coef", "must be finite"),
        ({"start_epoch": 0, "loss_weights": [1.0, 15.0]}, "loss_weights", "must be a mapping"),
        ({"start_epoch": 0, "loss_weights": {"bce": False}}, "loss_weights.bce", "must be a number, not bool"),
        ({"start_epoch": 0, "loss_weights": {"focal": -15}}, "loss_weights.focal", "must be >= 0"),
        ({"start_epoch": 0, "loss_weights": {"dice": -math.inf}}, "loss_weights.dice", "must be finite"),
        ({"start_epoch": 0, "name": 7}, "name", "must be a string, not int"),
    ],
)
def test_stage_problems_name_field_value_and_reason(kwargs, field, fragment):
    stage = Stage(**kwargs)
    problems = stage_problems(stage, 4)
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.index, problem.field) == (4, field)
    assert fragment in problem.message
    value = problem.value
    expected = kwargs[field] if field in kwargs else kwargs["loss_weights"][field.split(".", 1)[1]]
    assert value is expected or value == expected or (isinstance(value, float) and math.isnan(value))
    assert "stage 4" in str(problem) and f"`{field}`" in str(problem)


def test_stage_problems_carry_the_stage_name():
    (problem,) = stage_problems(Stage(name="finetune", start_epoch=0, lambda_coef=-1.0), 1)
    assert str(problem) == "stage 1 ('finetune'): `lambda_coef` = -1.0: must be >= 0"


def test_parse_stage_from_a_mapping():
    entry = {"name": "d", "start_epoch": 0, "end_epoch": 100, "distillation": True, "lambda_coef": 1.0,
             "loss_weights": {"bce": 0}}
    stage, problems = parse_stage(entry, 0)
    assert problems == []
    assert stage == Stage(name="d", start_epoch=0, end_epoch=100, distillation=True, lambda_coef=1.0,
                          loss_weights={"bce": 0})
    assert entry["loss_weights"] is not stage.loss_weights


def test_parse_stage_passes_a_stage_through():
    stage = Stage(start_epoch=2)
    assert parse_stage(stage, 0) == (stage, [])


def test_parse_stage_unknown_key_suggests_the_field():
    _, problems = parse_stage({"name": "kd", "start_epoch": 0, "lamda_coef": 0.5}, 3)
    assert [str(p) for p in problems] == [
        "stage 3 ('kd'): `lamda_coef` = 0.5: is not a stage field; did you mean `lambda_coef`?"
    ]


def test_parse_stage_unknown_key_without_a_close_field_lists_the_fields():
    _, problems = parse_stage({"start_epoch": 0, "optimizer": "adam"}, 0)
    assert len(problems) == 1
    assert problems[0].field == "optimizer"
    assert "the fields are: name, start_epoch, end_epoch, distillation, lambda_coef, loss_weights" in str(problems[0])


def test_parse_stage_requires_start_epoch():
    _, problems = parse_stage({"name": "x", "end_epoch": 5}, 1)
    assert [(p.index, p.name, p.field, p.message) for p in problems] == [(1, "x", "start_epoch", "is required")]


@pytest.mark.parametrize("entry", ["distill", 3, None, [0, 100]])
def test_parse_stage_rejects_a_non_mapping(entry):
    stage, problems = parse_stage(entry, 2)
    assert stage is None
    assert len(problems) == 1
    assert problems[0].index == 2 and problems[0].value == entry
    assert "a stage must be a mapping" in problems[0].message


def test_parse_stage_collects_every_problem_of_one_stage():
    _, problems = parse_stage({"name": "bad", "start_epoch": "0", "lamda": 1, "lambda_coef": -1,
                               "loss_weights": {"bce": math.nan}}, 0)
    assert sorted(p.field for p in problems) == ["lambda_coef", "lamda", "loss_weights.bce", "start_epoch"]
    assert all(p.index == 0 and p.name == "bad" for p in problems)


def _resolved(**overrides):
    values = {"name": "kd", "index": 1, "position": 2, "num_stages": 3, "start_epoch": 10, "end_epoch": 20,
                  "distillation": True, "lambda_coef": 0.5, "loss_weights": {"bce": 1.0}}
    values.update(overrides)
    return ResolvedStage(**values)


def test_resolved_stage_label_and_is_base():
    assert _resolved().label == "kd (2/3)"
    assert not _resolved().is_base
    base = _resolved(name="base", index=None, position=None)
    assert base.is_base
    assert base.label == "base (no stage)"


def test_stage_problem_value_is_the_given_object():
    weights = [1.0]
    (problem,) = stage_problems(Stage(start_epoch=0, loss_weights=weights), 0)  # type: ignore[arg-type]
    assert problem == StageProblem(problem.message, index=0, name=None, field="loss_weights", value=[1.0])
