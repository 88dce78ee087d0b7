"""StageSchedule: the seed's examples, the legacy config, the semantics of `at()`, every config error, state."""

import copy
import json
import math
import re

import pytest

from lightning_stages import ResolvedStage, Stage, StageConfigError, StageSchedule

# ---------------------------------------------------------------------------------------------------------------
# The seed's text, verbatim (../shared/seeds/000_860d4b68cab76f18.txt): the schema block and both examples.

SEED_SCHEMA = """\
// Root level of your config (siblings to "dataset", "model", ...)
"stage_schedule": [
  {
    "name": "(optional description)",
    "start_epoch": 0,            // inclusive
    "end_epoch": 100,            // exclusive – if omitted defaults to total epochs
    "distillation": true,        // enable teacher-student loss in this stage
    "lambda_coef": 1.0,          // scales the sum of all distill losses
    "loss_weights": {            // overrides train.loss_weights only in this stage
      "bce": 1.0,
      "focal": 15,
      "dice": 1.0,
      "iou": 1.0,
      "cls": 1.0
    }
  }
  /* , { … next stage … } */
]"""

SEED_EXAMPLE_1 = """\
"stage_schedule": [
  {
    "name": "distill_only",
    "start_epoch": 0,
    "end_epoch": 100,
    "distillation": true,
    "lambda_coef": 1.0,
    "loss_weights": { "bce": 0, "focal": 0, "dice": 0, "iou": 0, "cls": 0 }
  },
  {
    "name": "finetune_only",
    "start_epoch": 100,
    "end_epoch": 300,
    "distillation": false,
    "lambda_coef": 0.0,
    "loss_weights": { "bce": 1.0, "focal": 15, "dice": 1.0, "iou": 1.0, "cls": 1.0 }
  }
]"""

SEED_EXAMPLE_2 = """\
"stage_schedule": [
  { "name": "finetune_first",  "start_epoch": 0,   "end_epoch": 100, "distillation": false, "lambda_coef": 0.0,
    "loss_weights": { "bce": 1.0, "focal": 15, "dice": 1.0, "iou": 1.0, "cls": 1.0 }},
  { "name": "distill_second",  "start_epoch": 100, "end_epoch": 300, "distillation": true,  "lambda_coef": 1.0,
    "loss_weights": { "bce": 0,   "focal": 0,  "dice": 0,   "iou": 0,   "cls": 0   }}
]"""

# Written out by hand from the seed text, not computed by the code under test.
ZERO = {"bce": 0.0, "focal": 0.0, "dice": 0.0, "iou": 0.0, "cls": 0.0}
FULL = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}
DISTILL_ONLY = ("distill_only", 0, True, 1.0, ZERO)
FINETUNE_ONLY = ("finetune_only", 1, False, 0.0, FULL)
FINETUNE_FIRST = ("finetune_first", 0, False, 0.0, FULL)
DISTILL_SECOND = ("distill_second", 1, True, 1.0, ZERO)


def _config_file(tmp_path, fragment, head=""):
    """The seed fragment inside a full JSONC config with `//` comments, as a user would write it."""
    text = (
        "{\n"
        "  // an experiment config in the seed's format\n"
        '  "dataset": { "root": "/data/masks", "size": [256, 256] },   // ignored by the schedule\n'
        '  "model": { "arch": "unet", "encoder": "resnet18" },\n'
        f"{head}"
        f"{fragment}\n"
        "}\n"
    )
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    return path


def _summary(resolved: ResolvedStage):
    return resolved.name, resolved.index, resolved.distillation, resolved.lambda_coef, resolved.loss_weights


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, DISTILL_ONLY), (1, DISTILL_ONLY), (50, DISTILL_ONLY), (99, DISTILL_ONLY),
     (100, FINETUNE_ONLY), (101, FINETUNE_ONLY), (200, FINETUNE_ONLY), (299, FINETUNE_ONLY)],
)
def test_seed_example_1_distill_then_finetune(tmp_path, epoch, expected):
    schedule = StageSchedule.from_config(_config_file(tmp_path, SEED_EXAMPLE_1))
    resolved = schedule.at(epoch)
    assert _summary(resolved) == expected
    assert resolved.position == expected[1] + 1 and resolved.num_stages == 2
    assert not resolved.is_base
    assert schedule.needs_teachers


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, FINETUNE_FIRST), (42, FINETUNE_FIRST), (99, FINETUNE_FIRST),
     (100, DISTILL_SECOND), (150, DISTILL_SECOND), (299, DISTILL_SECOND)],
)
def test_seed_example_2_finetune_then_distill(tmp_path, epoch, expected):
    schedule = StageSchedule.from_config(_config_file(tmp_path, SEED_EXAMPLE_2))
    assert _summary(schedule.at(epoch)) == expected
    assert schedule.needs_teachers


@pytest.mark.parametrize(
    ("fragment", "stages"),
    [
        (SEED_EXAMPLE_1, [
            {"name": "distill_only", "start_epoch": 0, "end_epoch": 100, "distillation": True, "lambda_coef": 1.0,
             "loss_weights": ZERO},
            {"name": "finetune_only", "start_epoch": 100, "end_epoch": 300, "distillation": False,
             "lambda_coef": 0.0, "loss_weights": FULL},
        ]),
        (SEED_EXAMPLE_2, [
            Stage(name="finetune_first", start_epoch=0, end_epoch=100, distillation=False, lambda_coef=0.0,
                  loss_weights=FULL),
            Stage(name="distill_second", start_epoch=100, end_epoch=300, distillation=True, lambda_coef=1.0,
                  loss_weights=ZERO),
        ]),
    ],
)
def test_seed_examples_from_a_file_equal_the_hand_written_stages(tmp_path, fragment, stages):
    from_file = StageSchedule.from_config(_config_file(tmp_path, fragment))
    assert from_file == StageSchedule(stages)
    assert StageSchedule.from_config({"dataset": {}, "stage_schedule": stages}) == from_file


def test_seed_schema_block_verbatim(tmp_path):
    schedule = StageSchedule.from_config(_config_file(tmp_path, SEED_SCHEMA))
    (stage,) = schedule.stages
    assert stage == Stage(name="(optional description)", start_epoch=0, end_epoch=100, distillation=True,
                          lambda_coef=1.0, loss_weights=FULL)
    assert _summary(schedule.at(99)) == ("(optional description)", 0, True, 1.0, FULL)
    # past its end no stage covers the run: the base settings (nothing set: no distillation, lambda 1.0)
    after = schedule.at(100)
    assert after.is_base and after.distillation is False and after.lambda_coef == 1.0
    assert schedule.uncovered_ranges() == [(100, None)]


def test_seed_example_1_with_base_settings_and_total_epochs(tmp_path):
    head = (
        '  "train": { "epochs": 300, "lr": 0.001,\n'
        '             "loss_weights": { "bce": 2.0, "focal": 10, "dice": 3.0, "iou": 4.0, "cls": 5.0 } },\n'
        '  "distillation": { "enable": false, "lambda_coef": 0.25, "teacher": "teacher.ckpt" },  // base\n'
    )
    schedule = StageSchedule.from_config(_config_file(tmp_path, SEED_EXAMPLE_1, head))
    # every stage names all five weights, so the base weights never show through
    assert _summary(schedule.at(0)) == DISTILL_ONLY
    assert _summary(schedule.at(299)) == FINETUNE_ONLY
    assert schedule.total_epochs == 300
    assert schedule.uncovered_ranges() == []
    assert [r.label for r in schedule.timeline()] == ["distill_only (1/2)", "finetune_only (2/2)"]
    assert [(r.start_epoch, r.end_epoch) for r in schedule.timeline()] == [(0, 100), (100, 300)]
    # the base flag is false but a stage distills: teachers are needed (seed)
    assert schedule.distillation is False and schedule.needs_teachers


def test_seed_example_1_past_its_last_stage_runs_the_base(tmp_path):
    head = '  "train": { "epochs": 400, "loss_weights": { "bce": 2.0, "focal": 10, "dice": 3.0, "iou": 4.0, "cls": 5.0 } },\n'
    schedule = StageSchedule.from_config(_config_file(tmp_path, SEED_EXAMPLE_1, head))
    assert schedule.uncovered_ranges() == [(300, 400)]
    assert _summary(schedule.at(350)) == (
        "base", None, False, 1.0, {"bce": 2.0, "focal": 10.0, "dice": 3.0, "iou": 4.0, "cls": 5.0}
    )


def test_seed_example_beyond_train_epochs_is_an_error(tmp_path):
    head = '  "train": { "epochs": 100 },\n'
    with pytest.raises(StageConfigError, match=re.escape(
        "stage 1 ('distill_second'): `start_epoch` = 100: starts at or beyond total_epochs (100)"
    )):
        StageSchedule.from_config(_config_file(tmp_path, SEED_EXAMPLE_2, head))


# ---------------------------------------------------------------------------------------------------------------
# The legacy config: no stage_schedule means the single stage of the base settings.

LEGACY = {
    "dataset": {"root": "/data", "stage_schedule": "not ours", "lamda_coef": 3},
    "model": ["anything", {"goes": True}],
    "train": {"epochs": 20, "lr": 1e-3, "batch_size": 4,
              "loss_weights": {"bce": 1.0, "focal": 15, "dice": 1.0, "iou": 1.0, "cls": 0.5}},
    "distillation": {"enable": True, "lambda_coef": 0.7, "teacher_ckpt": "t.ckpt", "temperature": 4},
}


@pytest.mark.parametrize("epoch", [0, 1, 10, 19])
def test_legacy_config_is_a_single_stage_of_the_base(epoch):
    schedule = StageSchedule.from_config(LEGACY)
    assert schedule.stages == ()
    resolved = schedule.at(epoch)
    assert resolved.is_base and resolved.label == "base (no stage)"
    assert (resolved.distillation, resolved.lambda_coef) == (True, 0.7)
    assert resolved.loss_weights == {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 0.5}
    assert (resolved.start_epoch, resolved.end_epoch) == (0, 20)
    assert schedule.needs_teachers
    assert schedule.uncovered_ranges() == []


def test_legacy_config_without_distillation_needs_no_teachers(tmp_path):
    config = copy.deepcopy(LEGACY)
    config["distillation"]["enable"] = False
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps(config))
    schedule = StageSchedule.from_config(path)
    assert not schedule.needs_teachers
    assert schedule.at(5).distillation is False and schedule.at(5).lambda_coef == 0.7


def test_config_without_train_or_distillation_blocks():
    schedule = StageSchedule.from_config({"dataset": {}, "model": {}})
    resolved = schedule.at(0)
    assert (resolved.is_base, resolved.distillation, resolved.lambda_coef, resolved.loss_weights) == (
        True, False, 1.0, {},
    )
    assert (resolved.start_epoch, resolved.end_epoch) == (0, None)
    assert not schedule.needs_teachers


@pytest.mark.parametrize("stages", [None, []])
def test_null_or_empty_stage_schedule_is_the_legacy_behaviour(stages):
    config = {**LEGACY, "stage_schedule": stages}
    assert StageSchedule.from_config(config) == StageSchedule.from_config(LEGACY)


# ---------------------------------------------------------------------------------------------------------------
# Semantics of at()

BASE = {"bce": 1.0, "focal": 15.0, "dice": 1.0}


def test_omitted_end_epoch_is_the_total_epochs_from_the_config():
    schedule = StageSchedule.from_config({
        "train": {"epochs": 10},
        "stage_schedule": [{"name": "a", "start_epoch": 0, "end_epoch": 4}, {"name": "b", "start_epoch": 4}],
    })
    assert (schedule.at(4).name, schedule.at(4).end_epoch) == ("b", 10)
    assert schedule.at(9).name == "b"
    assert schedule.uncovered_ranges() == []


def test_omitted_end_epoch_is_the_total_epochs_given_to_at():
    schedule = StageSchedule([{"name": "a", "start_epoch": 0, "end_epoch": 4}, {"name": "b", "start_epoch": 4}])
    assert schedule.at(7, total_epochs=8).end_epoch == 8
    assert schedule.at(7, total_epochs=8).name == "b"
    assert schedule.uncovered_ranges(8) == []
    # the argument wins over the schedule's own total
    with_total = StageSchedule([{"start_epoch": 0}], total_epochs=5)
    assert with_total.at(0).end_epoch == 5
    assert with_total.at(0, total_epochs=12).end_epoch == 12


def test_without_any_end_a_stage_is_open_ended():
    schedule = StageSchedule([{"name": "late", "start_epoch": 3}])
    for epoch in (3, 4, 10**6):
        resolved = schedule.at(epoch)
        assert (resolved.name, resolved.start_epoch, resolved.end_epoch) == ("late", 3, None)
    assert schedule.uncovered_ranges() == [(0, 3)]


def test_loss_weights_override_key_by_key():
    schedule = StageSchedule([{"start_epoch": 0, "loss_weights": {"focal": 2}}], loss_weights=BASE)
    assert schedule.at(0).loss_weights == {"bce": 1.0, "focal": 2.0, "dice": 1.0}
    assert all(isinstance(v, float) for v in schedule.at(0).loss_weights.values())


def test_stage_without_base_weights_resolves_its_own_keys():
    schedule = StageSchedule([{"start_epoch": 0, "loss_weights": {"cls": 3}}])
    assert schedule.at(0).loss_weights == {"cls": 3.0}


@pytest.mark.parametrize(
    ("stage_lambda", "base_lambda", "expected"),
    [(None, 0.3, 0.3), (0.0, 0.3, 0.0), (2.5, 0.3, 2.5), (None, None, 1.0), (0, None, 0.0)],
)
def test_omitted_lambda_coef_inherits_the_base(stage_lambda, base_lambda, expected):
    entry = {"start_epoch": 0, "end_epoch": 2}
    if stage_lambda is not None:
        entry["lambda_coef"] = stage_lambda
    schedule = StageSchedule([entry], lambda_coef=base_lambda)
    assert schedule.at(1).lambda_coef == expected
    assert isinstance(schedule.at(1).lambda_coef, float)


@pytest.mark.parametrize(
    ("stage_flag", "base_flag", "expected"),
    [(None, True, True), (None, False, False), (None, None, False), (True, False, True), (False, True, False)],
)
def test_omitted_distillation_inherits_the_base_flag(stage_flag, base_flag, expected):
    entry = {"start_epoch": 0}
    if stage_flag is not None:
        entry["distillation"] = stage_flag
    assert StageSchedule([entry], distillation=base_flag).at(0).distillation is expected


def test_uncovered_epochs_resolve_to_the_base_and_are_reported():
    schedule = StageSchedule(
        [{"name": "a", "start_epoch": 2, "end_epoch": 4, "distillation": True, "lambda_coef": 5.0,
          "loss_weights": {"bce": 0}},
         {"name": "b", "start_epoch": 6, "end_epoch": 8, "loss_weights": {"dice": 9}}],
        loss_weights=BASE, distillation=False, lambda_coef=0.5, total_epochs=10,
    )
    assert schedule.uncovered_ranges() == [(0, 2), (4, 6), (8, 10)]
    for epoch, (start, end) in [(0, (0, 2)), (1, (0, 2)), (4, (4, 6)), (5, (4, 6)), (8, (8, 10)), (9, (8, 10))]:
        resolved = schedule.at(epoch)
        assert _summary(resolved) == ("base", None, False, 0.5, BASE), epoch
        assert (resolved.start_epoch, resolved.end_epoch) == (start, end), epoch
    assert _summary(schedule.at(3)) == ("a", 0, True, 5.0, {"bce": 0.0, "focal": 15.0, "dice": 1.0})
    assert _summary(schedule.at(7)) == ("b", 1, False, 0.5, {"bce": 1.0, "focal": 15.0, "dice": 9.0})
    assert [(r.name, r.start_epoch, r.end_epoch) for r in schedule.timeline()] == [
        ("base", 0, 2), ("a", 2, 4), ("base", 4, 6), ("b", 6, 8), ("base", 8, 10),
    ]


def test_uncovered_ranges_without_total_epochs_end_open():
    schedule = StageSchedule([{"start_epoch": 2, "end_epoch": 4}])
    assert schedule.uncovered_ranges() == [(0, 2), (4, None)]
    assert schedule.uncovered_ranges(6) == [(0, 2), (4, 6)]
    assert schedule.uncovered_ranges(4) == [(0, 2)]


def test_a_schedule_without_stages_reports_no_gap():
    assert StageSchedule().uncovered_ranges(10) == []
    assert StageSchedule(loss_weights=BASE).timeline(3)[0].loss_weights == BASE


def test_stages_written_out_of_order_keep_their_index():
    schedule = StageSchedule([{"name": "second", "start_epoch": 5}, {"name": "first", "start_epoch": 0,
                                                                     "end_epoch": 5}])
    first, second = schedule.at(0), schedule.at(5)
    assert (first.name, first.index, first.position, first.label) == ("first", 1, 1, "first (1/2)")
    assert (second.name, second.index, second.position, second.label) == ("second", 0, 2, "second (2/2)")


def test_unnamed_stage_is_named_by_its_index():
    schedule = StageSchedule([{"start_epoch": 0, "end_epoch": 2}, {"start_epoch": 2}])
    assert [schedule.at(e).name for e in (0, 2)] == ["stage_0", "stage_1"]


@pytest.mark.parametrize(
    ("stages", "base_flag", "expected"),
    [
        ([], None, False),
        ([], True, True),
        ([{"start_epoch": 0, "distillation": False}], False, False),
        ([{"start_epoch": 0, "end_epoch": 3, "distillation": False}, {"start_epoch": 3, "distillation": True}],
         False, True),
        ([{"start_epoch": 5, "distillation": True}], None, True),
        ([{"start_epoch": 0}], True, True),
        ([{"start_epoch": 0, "distillation": False}], True, True),
    ],
)
def test_needs_teachers(stages, base_flag, expected):
    assert StageSchedule(stages, distillation=base_flag).needs_teachers is expected


def test_at_is_pure_and_leaves_the_callers_data_alone():
    weights = {"bce": 1.0, "focal": 15.0}
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 3, "distillation": True, "loss_weights": {"bce": 0}},
              {"name": "ft", "start_epoch": 3}]
    stages_before, weights_before = copy.deepcopy(stages), copy.deepcopy(weights)
    schedule = StageSchedule(stages, loss_weights=weights, lambda_coef=0.5, total_epochs=6)
    state_before = copy.deepcopy(schedule.to_dict())

    first = schedule.at(1)
    again = schedule.at(1)
    assert first == again and first is not again
    first.loss_weights["bce"] = 123.0  # a caller mutating a result changes nothing for the next call
    assert schedule.at(1).loss_weights == {"bce": 0.0, "focal": 15.0}
    assert [schedule.at(e) for e in range(6)] == [schedule.at(e) for e in range(6)]

    assert stages == stages_before and weights == weights_before
    assert schedule.to_dict() == state_before
    # later changes to the caller's data do not reach the schedule either
    stages[0]["loss_weights"]["bce"] = 7.0
    stages.append({"start_epoch": 9})
    weights["focal"] = 0.0
    assert schedule.to_dict() == state_before
    assert schedule.at(1).loss_weights == {"bce": 0.0, "focal": 15.0}
    assert schedule.at(4).loss_weights == {"bce": 1.0, "focal": 15.0}


def test_from_config_does_not_change_the_mapping():
    config = copy.deepcopy(LEGACY)
    config["stage_schedule"] = [{"start_epoch": 0, "loss_weights": {"bce": 0}}]
    before = copy.deepcopy(config)
    StageSchedule.from_config(config).at(0).loss_weights["bce"] = 5
    assert config == before


def test_with_base_fills_only_unset_values():
    schedule = StageSchedule([{"start_epoch": 0}], lambda_coef=0.5)
    filled = schedule.with_base(loss_weights={"bce": 2.0}, distillation=True, lambda_coef=9.0, total_epochs=4)
    assert (filled.loss_weights, filled.distillation, filled.lambda_coef, filled.total_epochs) == (
        {"bce": 2.0}, True, 0.5, 4,
    )
    assert schedule.loss_weights is None and schedule.total_epochs is None


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every problem collected into one StageConfigError naming stage, field and value.


def _problems(stages, **base):
    with pytest.raises(StageConfigError) as info:
        StageSchedule(stages, **base)
    return info.value


def test_unknown_stage_key_suggests_the_field():
    err = _problems([{"name": "kd", "start_epoch": 0, "lamda_coef": 0.5}])
    assert "stage 0 ('kd'): `lamda_coef` = 0.5: is not a stage field; did you mean `lambda_coef`?" in str(err)


@pytest.mark.parametrize(
    ("entry", "field", "shown"),
    [
        ({"start_epoch": "3"}, "start_epoch", "'3'"),
        ({"start_epoch": 0, "end_epoch": "100"}, "end_epoch", "'100'"),
        ({"start_epoch": 0, "lambda_coef": "1.0"}, "lambda_coef", "'1.0'"),
        ({"start_epoch": 0, "loss_weights": [1, 15, 1, 1, 1]}, "loss_weights", "[1, 15, 1, 1, 1]"),
        ({"start_epoch": 0, "lambda_coef": True}, "lambda_coef", "True"),
        ({"start_epoch": False}, "start_epoch", "False"),
        ({"start_epoch": 0, "loss_weights": {"bce": True}}, "loss_weights.bce", "True"),
        ({"start_epoch": 0, "distillation": "true"}, "distillation", "'true'"),
    ],
)
def test_wrong_types_are_named(entry, field, shown):
    err = _problems([{"name": "s", **entry}])
    assert f"stage 0 ('s'): `{field}` = {shown}: must be " in str(err)
    assert [p.field for p in err.problems] == [field]


@pytest.mark.parametrize("value", [-1.0, -1, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["lambda_coef", "loss_weights.focal"])
def test_negative_or_non_finite_numbers_in_a_stage(field, value):
    entry = {"name": "x", "start_epoch": 0}
    if field == "lambda_coef":
        entry["lambda_coef"] = value
    else:
        entry["loss_weights"] = {"focal": value}
    err = _problems([{"start_epoch": 0, "end_epoch": 1}, {**entry, "start_epoch": 1}])
    (problem,) = err.problems
    assert (problem.index, problem.name, problem.field) == (1, "x", field)
    assert problem.message == ("must be >= 0" if value == -1 else "must be finite")
    assert f"stage 1 ('x'): `{field}` = {value!r}" in str(err)


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf])
@pytest.mark.parametrize("field", ["lambda_coef", "loss_weights"])
def test_negative_or_non_finite_base_numbers(field, value):
    if field == "lambda_coef":
        err = _problems([], lambda_coef=value)
        expected_field = "lambda_coef"
    else:
        err = _problems([], loss_weights={"bce": 1.0, "dice": value})
        expected_field = "loss_weights.dice"
    (problem,) = err.problems
    assert (problem.name, problem.field) == ("base", expected_field)
    assert f"base: `{expected_field}` = {value!r}" in str(err)


@pytest.mark.parametrize(("base", "field"), [({"loss_weights": [1.0]}, "loss_weights"),
                                             ({"distillation": "yes"}, "distillation"),
                                             ({"lambda_coef": "0.5"}, "lambda_coef"),
                                             ({"total_epochs": 0}, "total_epochs"),
                                             ({"total_epochs": 10.0}, "total_epochs"),
                                             ({"total_epochs": True}, "total_epochs")])
def test_wrong_base_types(base, field):
    (problem,) = _problems([], **base).problems
    assert (problem.name, problem.field) == ("base", field)


@pytest.mark.parametrize("key", [1, True, None, ("a", 1)])
def test_base_loss_weight_keys_must_be_strings_as_a_stages_must(key):
    err = _problems([{"name": "kd", "start_epoch": 0, "loss_weights": {"zzz": 0}}], loss_weights={key: 1.0, "bce": 2})
    assert [(p.index, p.name, p.field, p.value, p.message) for p in err.problems] == [
        (None, "base", "loss_weights", key, "loss names must be strings"),
        (0, "kd", "loss_weights.zzz", 0, "is not a task loss of this module")]
    assert str(err).endswith(f"; the task losses are: {key}, bce")
    stage_err = _problems([{"name": "kd", "start_epoch": 0, "loss_weights": {key: 1.0}}])
    assert [(p.field, p.value, p.message) for p in stage_err.problems] == [
        ("loss_weights", key, "loss names must be strings")]


def test_the_callbacks_base_loss_weight_keys_must_be_strings():
    from lightning_stages import StageScheduleCallback

    with pytest.raises(StageConfigError) as info:
        StageScheduleCallback(stage_schedule=[{"start_epoch": 0}], loss_weights={"bce": 1.0, 2: 1.0})
    assert [(p.name, p.field, p.value) for p in info.value.problems] == [("base", "loss_weights", 2)]


@pytest.mark.parametrize(("start", "end"), [(5, 5), (5, 2), (100, 0)])
def test_start_epoch_must_be_before_end_epoch(start, end):
    err = _problems([{"name": "bad", "start_epoch": start, "end_epoch": end}])
    assert f"stage 0 ('bad'): `end_epoch` = {end}: must be greater than `start_epoch` ({start})" in str(err)


def test_overlapping_stages():
    err = _problems([{"name": "a", "start_epoch": 0, "end_epoch": 10}, {"name": "b", "start_epoch": 5,
                                                                        "end_epoch": 15}])
    assert "stage 1 ('b'): `start_epoch` = 5: overlaps stage 0 ('a') which covers epochs [0, 10)" in str(err)


def test_a_stage_without_end_epoch_followed_by_another_overlaps():
    err = _problems([{"name": "open", "start_epoch": 0}, {"name": "next", "start_epoch": 50}])
    (problem,) = err.problems
    assert (problem.index, problem.name, problem.field, problem.value) == (1, "next", "start_epoch", 50)
    assert "overlaps stage 0 ('open') which covers epochs [0, end)" in str(err)
    assert "a stage without `end_epoch` runs to the last epoch" in str(err)


def test_every_overlap_is_reported_not_only_neighbours():
    err = _problems([{"name": "long", "start_epoch": 0, "end_epoch": 10},
                     {"name": "b", "start_epoch": 2, "end_epoch": 4},
                     {"name": "c", "start_epoch": 5, "end_epoch": 8}])
    assert sorted((p.index, p.value) for p in err.problems) == [(1, 2), (2, 5)]
    assert all("overlaps stage 0 ('long')" in p.message for p in err.problems)


def test_adjacent_stages_do_not_overlap():
    schedule = StageSchedule([{"start_epoch": 0, "end_epoch": 10}, {"start_epoch": 10, "end_epoch": 11}])
    assert schedule.at(10).index == 1


def test_epoch_problems_for_stages_starting_at_or_after_max_epochs():
    schedule = StageSchedule([{"name": "a", "start_epoch": 0, "end_epoch": 5},
                              {"name": "b", "start_epoch": 5, "end_epoch": 9},
                              {"name": "c", "start_epoch": 9}])
    assert [str(p) for p in schedule.epoch_problems(5)] == [
        "stage 1 ('b'): `start_epoch` = 5: starts at or beyond max_epochs (5), so it would never run",
        "stage 2 ('c'): `start_epoch` = 9: starts at or beyond max_epochs (5), so it would never run",
    ]
    assert [p.index for p in schedule.epoch_problems(6)] == [2]
    assert schedule.epoch_problems(10) == []


def test_misspelt_weight_key_via_weight_key_problems():
    schedule = StageSchedule([{"name": "ft", "start_epoch": 0, "loss_weights": {"foacl": 15, "bce": 1}}])
    (problem,) = schedule.weight_key_problems(["bce", "focal", "dice", "iou", "cls"])
    assert str(problem) == (
        "stage 0 ('ft'): `loss_weights.foacl` = 15: is not a task loss of this module; did you mean `focal`?"
    )
    assert schedule.weight_key_problems(["bce", "foacl"]) == []
    (far,) = schedule.weight_key_problems(["bce", "dice"])
    assert "the task losses are: bce, dice" in str(far)


def test_misspelt_weight_key_against_the_base_weights():
    err = _problems([{"name": "ft", "start_epoch": 0, "loss_weights": {"foacl": 15}}],
                    loss_weights={"bce": 1.0, "focal": 15.0})
    assert "stage 0 ('ft'): `loss_weights.foacl` = 15: is not a task loss of this module; did you mean `focal`?" \
        in str(err)


def test_misspelt_weight_key_in_a_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  loss_weights: {bce: 1, focal: 15}\nstage_schedule:\n"
                    "  - {name: ft, start_epoch: 0, loss_weights: {foacl: 2}}\n")
    with pytest.raises(StageConfigError, match=r"`loss_weights\.foacl` = 2: .*did you mean `focal`\?"):
        StageSchedule.from_config(path)


def test_missing_weight_problems_without_base_weights():
    schedule = StageSchedule([{"name": "a", "start_epoch": 0, "end_epoch": 2, "loss_weights": {"bce": 0}},
                              {"name": "b", "start_epoch": 2, "loss_weights": {"dice": 1}}])
    assert sorted((p.index, p.field) for p in schedule.missing_weight_problems()) == [
        (0, "loss_weights.dice"), (1, "loss_weights.bce"),
    ]
    assert StageSchedule(schedule.stages, loss_weights={"bce": 1, "dice": 1}).missing_weight_problems() == []


def test_several_problems_in_one_error_naming_each_stage():
    stages = [
        {"name": "warmup", "start_epoch": "0", "end_epoch": 10},
        {"name": "distill", "start_epoch": 10, "end_epoch": 20, "lamda_coef": 0.5, "lambda_coef": -1},
        {"name": "finetune", "start_epoch": 15, "loss_weights": {"foacl": 1.0, "bce": math.nan}},
        {"start_epoch": 30, "end_epoch": 30},
    ]
    err = _problems(stages, loss_weights={"bce": 1.0, "focal": 15.0})
    lines = str(err).splitlines()
    assert lines[0] == f"{len(err.problems)} problems in the stage schedule:"
    expected = [
        "stage 0 ('warmup'): `start_epoch` = '0': must be an integer, not str",
        "stage 1 ('distill'): `lamda_coef` = 0.5: is not a stage field; did you mean `lambda_coef`?",
        "stage 1 ('distill'): `lambda_coef` = -1: must be >= 0",
        "stage 2 ('finetune'): `loss_weights.bce` = nan: must be finite",
        "stage 3: `end_epoch` = 30: must be greater than `start_epoch` (30)",
        "stage 2 ('finetune'): `start_epoch` = 15: overlaps stage 1 ('distill') which covers epochs [10, 20)",
        "stage 2 ('finetune'): `loss_weights.foacl` = 1.0: is not a task loss of this module; did you mean `focal`?",
    ]
    for line in expected:
        assert f"  - {line}" in lines, line
    assert len(err.problems) == len(expected)


def test_problems_keep_the_written_index_after_a_non_mapping_entry():
    err = _problems(["distill", {"name": "a", "start_epoch": 0, "end_epoch": 5},
                     {"name": "b", "start_epoch": 3, "lambda_coef": -2}])
    assert {(p.index, p.field) for p in err.problems} == {(0, None), (2, "lambda_coef"), (2, "start_epoch")}
    assert "stage 2 ('b'): `start_epoch` = 3: overlaps stage 1 ('a')" in str(err)


@pytest.mark.parametrize("stages", [{"start_epoch": 0}, "stage", 5])
def test_stage_schedule_must_be_a_list(stages):
    with pytest.raises(StageConfigError, match=r"`stage_schedule` = .*: must be a list of stages"):
        StageSchedule(stages)


@pytest.mark.parametrize("value", [{}, {"start_epoch": 0}, ""])
def test_stage_schedule_in_a_config_must_be_a_list(value):
    with pytest.raises(StageConfigError, match="must be a list of stages"):
        StageSchedule.from_config({"stage_schedule": value})


def test_a_misspelt_stage_schedule_is_rejected():
    with pytest.raises(StageConfigError, match=re.escape("`stage_schedual` = ") + ".*did you mean `stage_schedule`"):
        StageSchedule.from_config({"dataset": {"root": "x"}, "stage_schedual": [{"start_epoch": 0}]})


@pytest.mark.parametrize(
    ("config", "field", "suggestion"),
    [
        ({"distilation": {"enable": True}}, "distilation", "distillation"),
        ({"train": {"epoch": 10}}, "train.epoch", "epochs"),
        ({"train": {"loss_weigths": {"bce": 1}}}, "train.loss_weigths", "loss_weights"),
        ({"distillation": {"enabel": True}}, "distillation.enabel", "enable"),
        ({"distillation": {"lambda_coeff": 0.5}}, "distillation.lambda_coeff", "lambda_coef"),
    ],
)
def test_near_miss_base_keys_warn_but_older_configs_still_load(config, field, suggestion):
    """An older config may hold keys like these for other purposes: they must keep loading (seed), with a warning."""
    with pytest.warns(UserWarning, match=re.escape(f"`{field}` = ") + f".*did you mean `{suggestion}`.*ignored"):
        schedule = StageSchedule.from_config({"dataset": {"root": "x"}, **config})
    assert schedule.stages == ()


@pytest.mark.parametrize(("config", "field"), [({"train": [1]}, "train"), ({"distillation": True}, "distillation")])
def test_config_sections_must_be_mappings(config, field):
    with pytest.raises(StageConfigError, match=f"`{field}` = .*must be a mapping"):
        StageSchedule.from_config(config)


def test_train_epochs_type_is_checked():
    with pytest.raises(StageConfigError, match=r"base: `total_epochs` = '300': must be a positive integer"):
        StageSchedule.from_config({"train": {"epochs": "300"}})


# ---------------------------------------------------------------------------------------------------------------
# State: to_dict / from_config round trip, diff.

ROUND_TRIP = [
    StageSchedule(),
    StageSchedule(loss_weights={"bce": 1.0}, distillation=True, lambda_coef=0.7, total_epochs=20),
    StageSchedule.from_config({"stage_schedule": json.loads("{" + SEED_EXAMPLE_1 + "}")["stage_schedule"],
                               "train": {"epochs": 300, "loss_weights": FULL},
                               "distillation": {"enable": False, "lambda_coef": 0.5}}),
    StageSchedule.from_config(json.loads("{" + SEED_EXAMPLE_2 + "}")),
    StageSchedule([Stage(start_epoch=0, end_epoch=3, distillation=True), Stage(start_epoch=5, lambda_coef=0)]),
    StageSchedule([{"name": "open", "start_epoch": 2, "loss_weights": {"cls": 0}}], loss_weights={"cls": 1}),
]


@pytest.mark.parametrize("schedule", ROUND_TRIP)
def test_to_dict_round_trip(schedule, tmp_path):
    state = schedule.to_dict()
    assert StageSchedule.from_config(state) == schedule
    # plain data: survives JSON, as in a checkpoint or a config file
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state))
    assert StageSchedule.from_config(path) == schedule
    assert schedule.diff(StageSchedule.from_config(state)) == []


def test_stages_as_dicts_or_objects_are_equal():
    as_dicts = StageSchedule([{"name": "a", "start_epoch": 0, "loss_weights": {"bce": 1}}])
    as_objects = StageSchedule([Stage(name="a", start_epoch=0, loss_weights={"bce": 1})])
    assert as_dicts == as_objects


def test_diff_names_each_change():
    old = StageSchedule(
        [{"name": "kd", "start_epoch": 0, "end_epoch": 10, "lambda_coef": 1.0, "loss_weights": {"bce": 0}},
         {"name": "ft", "start_epoch": 10}],
        loss_weights={"bce": 1.0}, lambda_coef=0.5, total_epochs=20,
    )
    new = StageSchedule(
        [{"name": "kd", "start_epoch": 0, "end_epoch": 12, "lambda_coef": 0.5, "loss_weights": {"bce": 0}},
         {"name": "ft", "start_epoch": 12, "distillation": True}],
        loss_weights={"bce": 2.0}, lambda_coef=0.5, total_epochs=30,
    )
    assert old.diff(new) == [
        "base loss_weights {'bce': 1.0} -> {'bce': 2.0}",
        "total_epochs 20 -> 30",
        "stage 0 ('kd'): end_epoch 10 -> 12",
        "stage 0 ('kd'): lambda_coef 1.0 -> 0.5",
        "stage 1 ('ft'): start_epoch 10 -> 12",
        "stage 1 ('ft'): distillation None -> True",
    ]
    assert new.diff(new) == []


def test_diff_names_a_changed_number_of_stages():
    one = StageSchedule([{"start_epoch": 0}])
    two = StageSchedule([{"start_epoch": 0, "end_epoch": 3}, {"start_epoch": 3}])
    assert "number of stages 1 -> 2" in one.diff(two)
    assert "stage 0: end_epoch None -> 3" in one.diff(two)
