"""StageProblem / StageConfigError formatting and the did-you-mean helper."""

import pickle

import pytest

from lightning_stages import StageConfigError, StageProblem
from lightning_stages.errors import did_you_mean


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        (
            StageProblem("must be >= 0", index=1, name="finetune", field="lambda_coef", value=-1.0),
            "stage 1 ('finetune'): `lambda_coef` = -1.0: must be >= 0",
        ),
        (
            StageProblem("must be an integer, not str", index=0, field="start_epoch", value="3"),
            "stage 0: `start_epoch` = '3': must be an integer, not str",
        ),
        (
            StageProblem("must be finite", name="base", field="loss_weights.bce", value=float("nan")),
            "base: `loss_weights.bce` = nan: must be finite",
        ),
        (
            StageProblem("is not a stage field", index=2, name="d", field="lamda_coef", value=0.5,
                         hint="did you mean `lambda_coef`?"),
            "stage 2 ('d'): `lamda_coef` = 0.5: is not a stage field; did you mean `lambda_coef`?",
        ),
        (StageProblem("cannot read config file 'x.json'"), "schedule: cannot read config file 'x.json'"),
    ],
)
def test_stage_problem_names_stage_field_value_and_hint(problem, expected):
    assert str(problem) == expected


def test_where_of_a_problem():
    assert StageProblem("x", index=3).where == "stage 3"
    assert StageProblem("x", index=3, name="warm").where == "stage 3 ('warm')"
    assert StageProblem("x", name="base").where == "base"
    assert StageProblem("x").where == "schedule"


def test_config_error_is_a_value_error_listing_every_problem():
    problems = [
        StageProblem("must be >= 0", index=0, name="a", field="lambda_coef", value=-1),
        StageProblem("must be finite", index=1, name="b", field="loss_weights.focal", value=float("inf")),
    ]
    err = StageConfigError(problems)
    assert isinstance(err, ValueError)
    assert err.problems == tuple(problems)
    assert str(err).splitlines() == [
        "2 problems in the stage schedule:",
        "  - stage 0 ('a'): `lambda_coef` = -1: must be >= 0",
        "  - stage 1 ('b'): `loss_weights.focal` = inf: must be finite",
    ]


def test_config_error_from_one_problem_or_a_string():
    single = StageConfigError(StageProblem("bad", index=0))
    assert str(single) == "1 problem in the stage schedule:\n  - stage 0: bad"
    text = StageConfigError("file is broken")
    assert text.problems == (StageProblem("file is broken"),)
    assert str(text).endswith("  - schedule: file is broken")
    with pytest.raises(ValueError, match="2 problems"):
        raise StageConfigError(["one", "two"])


def test_config_error_survives_pickling():
    err = StageConfigError([StageProblem("must be >= 0", index=1, name="b", field="lambda_coef", value=-2.0)])
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StageConfigError
    assert back.problems == err.problems
    assert str(back) == str(err)


@pytest.mark.parametrize(
    ("word", "candidates", "expected"),
    [
        ("lamda_coef", ["name", "start_epoch", "end_epoch", "distillation", "lambda_coef", "loss_weights"],
         "lambda_coef"),
        ("foacl", ["bce", "focal", "dice", "iou", "cls"], "focal"),
        ("stage_schedual", ["stage_schedule", "train", "distillation"], "stage_schedule"),
        ("end_epch", ["start_epoch", "end_epoch"], "end_epoch"),
        ("distilation", ["distillation", "lambda_coef"], "distillation"),
    ],
)
def test_did_you_mean_suggests_the_closest(word, candidates, expected):
    assert did_you_mean(word, candidates) == f"did you mean `{expected}`?"


@pytest.mark.parametrize(("word", "candidates"), [("zzz", ["bce", "focal"]), ("focal", []), ("optimizer", ["bce"])])
def test_did_you_mean_is_none_without_a_close_candidate(word, candidates):
    assert did_you_mean(word, candidates) is None
