"""Property-based tests: thousands of valid and malformed configs in the seed's format.

Every malformed one raises ``StageConfigError`` whose problems name the stage and the field that was broken; no
other exception escapes. Every valid one is accepted and resolves, epoch by epoch, to what a by-hand reading of the
config says.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_stages import StageConfigError, StageSchedule
from lightning_stages.errors import printable

LOSS_KEYS = ("bce", "focal", "dice", "iou", "cls")
STAGE_FIELDS = ("name", "start_epoch", "end_epoch", "distillation", "lambda_coef", "loss_weights")
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

weights = st.sampled_from([0, 1, 2, 15, 0.0, 0.5, 1.0, 2.5, 1e-3, 100.0])
names = st.sampled_from(["distill_only", "finetune_only", "joint", "warm-up", "stage 2", "a", ""])


@st.composite
def valid_configs(draw) -> dict[str, Any]:
    total = draw(st.integers(1, 40))
    starts = sorted(draw(st.sets(st.integers(0, total - 1), max_size=min(5, total))))
    stages = []
    for i, start in enumerate(starts):
        stage: dict[str, Any] = {"start_epoch": start}
        next_start = starts[i + 1] if i + 1 < len(starts) else total
        given_fields = draw(st.integers(0, 31))  # one bit per optional field
        if i + 1 < len(starts) or given_fields & 1:  # only the last stage may run to the end without `end_epoch`
            stage["end_epoch"] = draw(st.integers(start + 1, next_start))
        if given_fields & 2:
            stage["name"] = draw(names)
        if given_fields & 4:
            stage["distillation"] = draw(st.booleans())
        if given_fields & 8:
            stage["lambda_coef"] = draw(weights)
        if given_fields & 16:
            keys = draw(st.lists(st.sampled_from(LOSS_KEYS), unique=True))
            stage["loss_weights"] = {k: draw(weights) for k in keys}
        stages.append(stage)
    config: dict[str, Any] = {
        "stage_schedule": draw(st.permutations(stages)),  # any order: stages are sorted by start_epoch
        "train": {"epochs": total, "loss_weights": dict(zip(LOSS_KEYS, draw(st.tuples(*[weights] * len(LOSS_KEYS)))))},
        "dataset": {"ignored": True},
    }
    base_fields = draw(st.integers(0, 3))
    distillation = {}
    if base_fields & 1:
        distillation["enable"] = draw(st.booleans())
    if base_fields & 2:
        distillation["lambda_coef"] = draw(weights)
    if distillation:
        config["distillation"] = distillation
    return config


def _by_hand(config: dict[str, Any], epoch: int) -> tuple:
    """What the seed's format says for ``epoch``: (name, index, distillation, lambda_coef, weights)."""
    total = config["train"]["epochs"]
    base = config.get("distillation", {})
    base_flag, base_lambda = base.get("enable", False), float(base.get("lambda_coef", 1.0))
    base_weights = {k: float(v) for k, v in config["train"]["loss_weights"].items()}
    for index, stage in enumerate(config["stage_schedule"]):
        if stage["start_epoch"] <= epoch < stage.get("end_epoch", total):
            return (
                stage.get("name", f"stage_{index}"), index, stage.get("distillation", base_flag),
                float(stage.get("lambda_coef", base_lambda)),
                {**base_weights, **{k: float(v) for k, v in stage.get("loss_weights", {}).items()}},
            )
    return ("base", None, base_flag, base_lambda, base_weights)


@settings(FAST, max_examples=600)
@given(valid_configs())
def test_every_valid_config_is_accepted_and_resolves_every_epoch(config):
    schedule = StageSchedule.from_config(config)
    total = config["train"]["epochs"]
    for epoch in range(total):
        r = schedule.at(epoch)
        assert (r.name, r.index, r.distillation, r.lambda_coef, r.loss_weights) == _by_hand(config, epoch)
        assert r.start_epoch <= epoch and (r.end_epoch is None or epoch < r.end_epoch)
    # the timeline tiles [0, total) without holes or overlaps
    timeline = schedule.timeline()
    assert timeline[0].start_epoch == 0 and timeline[-1].end_epoch == total
    assert all(a.end_epoch == b.start_epoch for a, b in itertools.pairwise(timeline))
    # the copy saved in checkpoints reads back to the same schedule
    again = StageSchedule.from_config(schedule.to_dict())
    assert again.diff(schedule) == [] and [again.at(e) for e in range(total)] == [schedule.at(e) for e in range(total)]


# ---------------------------------------------------------------------------------------------- malformed configs

BAD_INT = st.sampled_from(["3", 1.5, True, None, [0], {"a": 1}, float("nan")])
BAD_NUMBER = st.sampled_from([-0.5, -3, float("nan"), float("inf"), -float("inf"), "1.0", True, None, [1], {}])
BAD_FLAG = st.sampled_from(["yes", "true", 1, 0, 1.0, [], {}])
UNKNOWN_FIELDS = st.one_of(
    st.sampled_from(["lamda_coef", "end_epcoh", "distilation", "lossweights", "start", "epochs", "weights"]),
    st.text(min_size=1, max_size=12).filter(lambda k: k not in STAGE_FIELDS),
)
UNKNOWN_LOSSES = st.one_of(
    st.sampled_from(["foacl", "Dice", "bce_", "ioU", "seg"]), st.text(min_size=1, max_size=8)
).filter(lambda k: k not in LOSS_KEYS)


@st.composite
def stage_breakage(draw, stage: dict[str, Any]) -> tuple[Any, Optional[str]]:
    """Break one field of one stage; return the broken stage and the field its problem must name."""
    stage = dict(stage)
    kind = draw(st.sampled_from(["start", "no_start", "end", "flag", "lambda", "weights_type", "weight", "weight_key",
                                 "unknown_field", "name", "not_a_mapping"]))
    if kind == "start":
        stage["start_epoch"] = draw(st.one_of(st.integers(-50, -1), BAD_INT))
        stage.pop("end_epoch", None)
        return stage, "start_epoch"
    if kind == "no_start":
        del stage["start_epoch"]
        stage.pop("end_epoch", None)
        return stage, "start_epoch"
    if kind == "end":
        stage["end_epoch"] = draw(st.one_of(st.integers(stage["start_epoch"] - 5, stage["start_epoch"]),
                                            BAD_INT.filter(lambda v: v is not None)))
        return stage, "end_epoch"
    if kind == "flag":
        stage["distillation"] = draw(BAD_FLAG)
        return stage, "distillation"
    if kind == "lambda":
        stage["lambda_coef"] = draw(BAD_NUMBER.filter(lambda v: v is not None))
        return stage, "lambda_coef"
    if kind == "weights_type":
        stage["loss_weights"] = draw(st.sampled_from([[1.0, 2.0], "bce", 3, True]))
        return stage, "loss_weights"
    if kind == "weight":
        key = draw(st.sampled_from(LOSS_KEYS))
        stage["loss_weights"] = {**stage.get("loss_weights", {}), key: draw(BAD_NUMBER)}
        return stage, f"loss_weights.{key}"
    if kind == "weight_key":
        stage["loss_weights"] = {**stage.get("loss_weights", {}), draw(st.sampled_from([3, None, 1.5])): 1.0}
        return stage, "loss_weights"
    if kind == "unknown_field":
        field = draw(UNKNOWN_FIELDS)
        stage[field] = draw(st.sampled_from([0, 1.0, True, "x", None]))
        return stage, field
    if kind == "name":
        stage["name"] = draw(st.sampled_from([3, ["a"], {"a": 1}, True, 1.5]))
        return stage, "name"
    return draw(st.sampled_from([None, 3, "stage", [1, 2], 2.5])), None  # not a mapping: the problem names the stage


@st.composite
def malformed_configs(draw) -> tuple[dict[str, Any], list[tuple[Optional[int], Optional[str]]]]:
    """A valid config with breakages, and the (stage index, field) each breakage must be reported under.

    Field-level breakages (1 to 3, in different stages or the base) are all reported together. Breakages that only
    show between stages (overlap, a stage past the end, a weight that names no task loss) or in the file's layout
    are made alone, since they are checked once the fields themselves are sound.
    """
    config = draw(valid_configs())
    stages = [dict(s) for s in config["stage_schedule"]]
    config = {**config, "stage_schedule": stages, "train": dict(config["train"])}
    expected: list[tuple[Optional[int], Optional[str]]] = []
    mode = draw(st.sampled_from(["fields", "fields", "fields", "overlap", "past_end", "unknown_loss", "layout"]))
    if mode == "fields":
        targets = draw(st.lists(st.sampled_from([*range(len(stages)), "epochs", "base_weight", "enable", "lambda"]),
                                min_size=1, max_size=3, unique=True))
        for target in targets:
            if isinstance(target, int):
                stages[target], field = draw(stage_breakage(stages[target]))
                expected.append((target, field))
            elif target == "epochs":
                config["train"]["epochs"] = draw(st.one_of(st.integers(-5, 0), BAD_INT.filter(lambda v: v is not None)))
                expected.append((None, "total_epochs"))
            elif target == "base_weight":
                key = draw(st.sampled_from(LOSS_KEYS))
                config["train"]["loss_weights"] = {**config["train"]["loss_weights"], key: draw(BAD_NUMBER)}
                expected.append((None, f"loss_weights.{key}"))
            else:
                section = dict(config.get("distillation", {}))
                if target == "enable":
                    section["enable"] = draw(BAD_FLAG)
                    expected.append((None, "distillation"))
                else:
                    section["lambda_coef"] = draw(BAD_NUMBER.filter(lambda v: v is not None))
                    expected.append((None, "lambda_coef"))
                config["distillation"] = section
        return config, expected
    order = sorted(range(len(stages)), key=lambda i: stages[i]["start_epoch"])
    if mode == "overlap" and len(stages) >= 2:
        pos = draw(st.integers(0, len(order) - 2))
        earlier, later = order[pos], order[pos + 1]
        stages[earlier]["end_epoch"] = stages[later]["start_epoch"] + draw(st.integers(1, 5))
        return config, [(later, "start_epoch")]
    if mode == "past_end" and stages:
        last = order[-1]
        stages[last].pop("end_epoch", None)
        stages[last]["start_epoch"] = config["train"]["epochs"] + draw(st.integers(0, 5))
        return config, [(last, "start_epoch")]
    if mode == "unknown_loss" and stages:
        index = draw(st.integers(0, len(stages) - 1))
        key = draw(UNKNOWN_LOSSES)
        stages[index]["loss_weights"] = {**stages[index].get("loss_weights", {}), key: 1.0}
        return config, [(index, f"loss_weights.{key}")]
    # the layout of the file: a misspelt section, a section of the wrong type, a schedule that is not a list
    kind = draw(st.sampled_from(["misspelt_root", "train_type", "schedule_type"]))
    if kind == "misspelt_root":
        config["stage_shedule"] = config.pop("stage_schedule")
        return config, [(None, "stage_shedule")]
    if kind == "train_type":
        config["train"] = draw(st.sampled_from([[1], "train", 3]))
        return config, [(None, "train")]
    config["stage_schedule"] = draw(st.sampled_from(["stages", {"start_epoch": 0}, 5, 2.5]))
    return config, [(None, "stage_schedule")]


@settings(FAST, max_examples=1200)
@given(malformed_configs())
def test_every_malformed_config_raises_one_error_naming_stage_and_field(case):
    config, expected = case
    with pytest.raises(StageConfigError) as info:  # any other exception fails the test
        StageSchedule.from_config(config)
    problems = info.value.problems
    message = str(info.value)
    for index, field in expected:
        matching = [p for p in problems if p.index == index and p.field == field]
        assert matching, f"no problem for stage {index}, field {field!r} in:\n{message}"
        if index is not None:
            assert f"stage {index}" in message
        if field is not None:
            assert f"`{printable(field)}`" in message  # control characters escaped


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 60), st.floats(allow_nan=True), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from([*STAGE_FIELDS, "enable", "epochs", "x"]), inner, max_size=5),
    ),
    max_leaves=12,
)
junk_configs = st.fixed_dictionaries(
    {},
    optional={
        "stage_schedule": st.one_of(json_values, st.lists(st.dictionaries(st.sampled_from(STAGE_FIELDS), json_values,
                                                                          max_size=6), max_size=4)),
        "train": st.one_of(json_values, st.fixed_dictionaries({}, optional={"epochs": json_values,
                                                                          "loss_weights": json_values})),
        "distillation": st.one_of(json_values, st.fixed_dictionaries({}, optional={"enable": json_values,
                                                                                 "lambda_coef": json_values})),
    },
)


@settings(FAST, max_examples=300)
@pytest.mark.filterwarnings("ignore::UserWarning")
@given(junk_configs)
def test_arbitrary_json_is_accepted_or_refused_with_the_one_error_type(config):
    try:
        schedule = StageSchedule.from_config(config)
    except StageConfigError as err:
        assert err.problems and all(p.message for p in err.problems)
        return
    total = schedule.total_epochs if schedule.total_epochs is not None else 5
    for epoch in range(min(total, 60)):
        resolved = schedule.at(epoch)
        assert math.isfinite(resolved.lambda_coef) and resolved.lambda_coef >= 0
