"""Ramps: ``lambda_coef`` and the loss weights go from the values before a stage to the stage's own, linearly or along
a half cosine, per batch (epoch ramps) or per optimizer step (step ramps). Every value is checked against the formula
of issue 11 computed here by hand; distillation follows the effective coefficient."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Capture, TinyNet, trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageConfigError, StageSchedule, StageScheduleCallback

BATCHES = 4  # per epoch


def s_of(shape: str, p: float) -> float:
    """The issue's shapes, written out again: p clipped to [0, 1]; linear p, cosine (1 - cos(pi p)) / 2."""
    p = min(max(p, 0.0), 1.0)
    return p if shape == "linear" else (1 - math.cos(math.pi * p)) / 2


def between(prev: float, target: float, shape: str, p: float) -> float:
    return prev + (target - prev) * s_of(shape, p)


# distill (λ 1.0, cls 0) for 2 epochs, then finetune (no distillation) ramped in over 2 epochs
OUT_OF_KD = [
    {"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True, "lambda_coef": 1.0,
     "loss_weights": {"cls": 0.0}},
    {"name": "ft", "start_epoch": 2, "end_epoch": 5, "distillation": False, "lambda_coef": 0.3, "ramp_epochs": 2},
]


def expected_out_of_kd(epoch: int, batch: int, shape: str = "linear") -> tuple[bool, float, float]:
    """(use_distillation, lambda_coef, cls weight) by hand: eff 1.0 -> 0, cls 0 -> 1 over epochs [2, 4)."""
    if epoch < 2:
        return True, 1.0, 0.0
    p = (epoch + batch / BATCHES - 2) / 2
    if p >= 1:
        return False, 0.3, 1.0
    lam = between(1.0, 0.0, shape, p)
    return lam > 0, lam, between(0.0, 1.0, shape, p)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_epoch_ramp_out_of_distillation_per_batch(shape):
    stages = [dict(OUT_OF_KD[0]), {**OUT_OF_KD[1], "ramp_shape": shape}]
    schedule = StageSchedule(stages, loss_weights={"cls": 1.0}, total_epochs=5)
    for epoch in range(5):
        for batch in range(BATCHES):
            got = schedule.at(epoch, batch, BATCHES)
            distill, lam, cls = expected_out_of_kd(epoch, batch, shape)
            assert got.name == ("kd" if epoch < 2 else "ft")
            assert got.distillation is distill, (epoch, batch)
            assert got.lambda_coef == pytest.approx(lam, abs=1e-12), (epoch, batch)
            assert got.loss_weights["cls"] == pytest.approx(cls, abs=1e-12), (epoch, batch)
    # the first batch of the stage has the previous values, the last of the ramp is short of the target
    assert (schedule.at(2).lambda_coef, schedule.at(2).distillation, schedule.at(2).ramping) == (1.0, True, True)
    assert schedule.at(4).ramping is False and schedule.at(4) == schedule.stage_at(4)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_step_ramp_into_distillation_starts_from_zero_and_distills_throughout(shape):
    schedule = StageSchedule([
        {"name": "ft", "start_step": 0, "end_step": 10, "distillation": False, "lambda_coef": 0.9},
        {"name": "kd", "start_step": 10, "end_step": 30, "distillation": True, "lambda_coef": 0.5,
         "loss_weights": {"cls": 0.2}, "ramp_steps": 8, "ramp_shape": shape},
    ], loss_weights={"cls": 1.0})
    for step in range(30):
        got = schedule.at_step(step)
        if step < 10:
            assert (got.name, got.distillation, got.lambda_coef, got.loss_weights) == ("ft", False, 0.9, {"cls": 1.0})
            continue
        p = (step - 10) / 8
        # previous effective coefficient is 0 (ft does not distill), whatever lambda_coef it names
        assert got.lambda_coef == pytest.approx(between(0.0, 0.5, shape, p), abs=1e-12), step
        assert got.loss_weights["cls"] == pytest.approx(between(1.0, 0.2, shape, p), abs=1e-12), step
        assert got.distillation is True  # the stage itself distills
        assert got.ramping is (step < 18)
    assert schedule.at_step(10).lambda_coef == 0.0


def test_ramp_between_two_distilling_stages_and_from_the_base():
    schedule = StageSchedule([
        {"name": "a", "start_step": 0, "end_step": 4, "distillation": True, "lambda_coef": 2.0, "ramp_steps": 2},
        {"name": "b", "start_step": 6, "distillation": True, "lambda_coef": 0.5, "ramp_steps": 4},
    ], loss_weights={"cls": 1.0}, lambda_coef=0.7, distillation=True, total_steps=12)
    # stage a starts at 0: from the base (distills, 0.7)
    assert [schedule.at_step(s).lambda_coef for s in range(3)] == pytest.approx([0.7, 1.35, 2.0])
    # steps 4, 5 are uncovered (base); b ramps from the base's 0.7, not from a's 2.0
    assert [schedule.at_step(s).lambda_coef for s in (4, 5, 6, 7, 10)] == pytest.approx([0.7, 0.7, 0.7, 0.65, 0.5])


def test_ramp_steps_in_an_epoch_schedule_counts_optimizer_steps():
    schedule = StageSchedule([
        {"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True, "lambda_coef": 1.0},
        {"name": "ft", "start_epoch": 1, "end_epoch": 4, "distillation": False, "ramp_steps": 4},
    ], loss_weights={"cls": 1.0})
    # 4 batches per epoch, accumulate 2: 2 optimizer steps per epoch; (epoch, batch) -> steps since the stage began
    got = [schedule.at(e, b, BATCHES, accumulate_grad_batches=2).lambda_coef for e in (1, 2, 3) for b in range(4)]
    steps = [(e - 1) * 2 + b // 2 for e in (1, 2, 3) for b in range(4)]
    assert got == pytest.approx([1.0 - min(s / 4, 1.0) if s < 4 else 1.0 for s in steps])


class Recorder(TinyNet):
    """Writes down what every training batch saw, and how often the teacher ran in it."""

    def __init__(self) -> None:
        super().__init__(loss_weights={"cls": 1.0})
        self.rows: list[tuple] = []

    def distill_losses(self, logits, x):
        teacher = self.teachers.get("teacher")
        before = getattr(teacher, "calls", 0)
        out = super().distill_losses(logits, x)
        self._calls = getattr(teacher, "calls", 0) - before
        return out

    def teacher(self):
        class Counting(torch.nn.Linear):
            calls = 0

            def forward(self, x):
                type(self).calls += 1
                return super().forward(x)

        return Counting(4, self.classes)

    def record(self, batch, batch_idx, loss):
        t = self.trainer
        self.rows.append((t.current_epoch, batch_idx, t.global_step, self.stage_name, self.use_distillation,
                          self.lambda_coef, self.loss_weights["cls"], self._calls))


def _data(batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = 4 * batches
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=4)


def test_epoch_ramp_in_training_with_accumulation_per_batch_and_teacher_calls(tmp_path):
    model, logger = Recorder(), Capture()
    callback = StageScheduleCallback(stage_schedule=OUT_OF_KD, verbose=False)
    trainer(tmp_path, max_epochs=5, callbacks=[callback], accumulate_grad_batches=2, logger=logger).fit(
        model, _data(BATCHES))
    assert len(model.rows) == 5 * BATCHES
    for epoch, batch, step, stage, distill, lam, cls, calls in model.rows:
        want_distill, want_lam, want_cls = expected_out_of_kd(epoch, batch)
        assert stage == ("kd" if epoch < 2 else "ft")
        assert (distill, lam, cls) == (want_distill, pytest.approx(want_lam), pytest.approx(want_cls)), (epoch, batch)
        # the teacher runs exactly where the effective coefficient is > 0 or the stage distills
        assert calls == int(want_lam > 0 and want_distill), (epoch, batch)
        assert step == epoch * 2 + batch // 2
    # stage/* scalars: once per epoch, and once per optimizer step while the ramp runs (steps 4..7)
    logged = [(step, m["stage/lambda_coef"]) for step, m in logger.calls if "stage/lambda_coef" in m]
    assert [step for step, _ in logged] == [0, 2, 4, 5, 6, 7, 8]
    assert [lam for _, lam in logged] == pytest.approx(
        [1.0, 1.0] + [expected_out_of_kd(2 + (s - 4) // 2, 2 * (s % 2))[1] for s in (4, 5, 6, 7)] + [0.3])


def test_step_ramp_in_training_with_accumulation_same_values_within_an_optimizer_step(tmp_path):
    stages = [
        {"name": "kd", "start_step": 0, "end_step": 3, "distillation": True, "lambda_coef": 1.0,
         "loss_weights": {"cls": 0.0}},
        {"name": "ft", "start_step": 3, "distillation": False, "ramp_steps": 4, "ramp_shape": "cosine"},
    ]
    model, logger = Recorder(), Capture()
    callback = StageScheduleCallback(stage_schedule=stages, verbose=False)
    trainer(tmp_path, max_epochs=-1, max_steps=9, callbacks=[callback], accumulate_grad_batches=2,
            logger=logger).fit(model, _data(6))
    assert len(model.rows) == 18
    for epoch, batch, step, stage, distill, lam, cls, calls in model.rows:
        assert step == (epoch * 6 + batch) // 2  # 6 batches per epoch: an optimizer step spans the epoch boundary
        if step < 3:
            assert (stage, distill, lam, cls, calls) == ("kd", True, 1.0, 0.0, 1)
            continue
        p = (step - 3) / 4
        want = between(1.0, 0.0, "cosine", p) if p < 1 else 1.0
        assert stage == "ft"
        assert lam == pytest.approx(want), step
        assert cls == pytest.approx(between(0.0, 1.0, "cosine", p)), step
        assert distill is (p < 1) and calls == int(p < 1), step
    # both batches of every optimizer step see the same values
    by_step: dict[int, set] = {}
    for row in model.rows:
        by_step.setdefault(row[2], set()).add(row[3:7])
    assert all(len(values) == 1 for values in by_step.values())
    ramp_logs = [step for step, m in logger.calls if "stage/lambda_coef" in m]
    assert ramp_logs == [0, 3, 4, 5, 6, 7]  # epoch start, where ft begins, then every step of its ramp


def test_outside_a_ramp_the_batch_hook_writes_nothing(tmp_path):
    class Watch(Recorder):
        writes = 0

        def __setattr__(self, name, value):
            if name == "lambda_coef":
                type(self).writes += 1
            super().__setattr__(name, value)

    stages = [{"name": "kd", "start_step": 0, "end_step": 5, "distillation": True},
              {"name": "ft", "start_step": 5, "distillation": False}]
    model = Watch()
    trainer(tmp_path, max_epochs=2, callbacks=[StageScheduleCallback(stage_schedule=stages, verbose=False)]).fit(
        model, _data(BATCHES))
    # setup, train start, 2 epoch starts, the boundary at step 5: 5 writes for 8 batches (plus __init__'s)
    assert Watch.writes - 1 <= 5


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"start_epoch": 0, "end_epoch": 2, "ramp_epochs": 3},
         "stage 0: `ramp_epochs` = 3: is longer than the stage (2 epochs, [0, 2))"),
        ({"start_epoch": 0, "ramp_epochs": 0}, "stage 0: `ramp_epochs` = 0: must be a finite number > 0"),
        ({"start_epoch": 0, "ramp_epochs": -1.5}, "stage 0: `ramp_epochs` = -1.5: must be a finite number > 0"),
        ({"start_epoch": 0, "ramp_epochs": math.inf}, "stage 0: `ramp_epochs` = inf: must be a finite number > 0"),
        ({"start_epoch": 0, "ramp_epochs": math.nan}, "stage 0: `ramp_epochs` = nan: must be a finite number > 0"),
        ({"start_step": 0, "ramp_steps": 0}, "stage 0: `ramp_steps` = 0: must be an integer > 0"),
        ({"start_step": 0, "ramp_steps": 2.5}, "stage 0: `ramp_steps` = 2.5: must be an integer, not float"),
        ({"name": "ft", "start_step": 0, "end_step": 10, "ramp_steps": 11},
         "stage 0 ('ft'): `ramp_steps` = 11: is longer than the stage (10 steps, [0, 10))"),
        ({"start_step": 0, "ramp_epochs": 1},
         "stage 0: `ramp_epochs` = 1: is not for a stage in steps; use `ramp_steps`"),
        ({"start_epoch": 0, "ramp_epochs": 1, "ramp_shape": "cosin"},
         "stage 0: `ramp_shape` = 'cosin': is not a ramp shape; did you mean `cosine`?"),
        ({"start_epoch": 0, "ramp_epochs": 1, "ramp_shape": "exp"},
         "stage 0: `ramp_shape` = 'exp': is not a ramp shape; the shapes are: linear, cosine"),
        ({"start_epoch": 0, "ramp_shape": "linear"}, "stage 0: `ramp_shape` = 'linear': needs `ramp_epochs` or"),
        ({"start_epoch": 0, "ramp_epochs": 1, "ramp_steps": 4},
         "stage 0: `ramp_steps` = 4: give `ramp_epochs` or `ramp_steps`, not both"),
    ],
)
def test_every_ramp_error_names_stage_field_and_value(stage, message):
    with pytest.raises(StageConfigError) as info:
        StageSchedule([stage])
    assert message in str(info.value)


def test_a_ramp_longer_than_a_stage_that_ends_with_the_run_is_refused_at_setup(tmp_path):
    callback = StageScheduleCallback(stage_schedule=[{"name": "ft", "start_epoch": 1, "ramp_epochs": 3}])
    with pytest.raises(StageConfigError, match=r"stage 0 \('ft'\): `ramp_epochs` = 3: is longer than the stage "
                                               r"\(2 epochs, \[1, 3\)\)"):
        trainer(tmp_path, max_epochs=3, callbacks=[callback]).fit(Recorder(), _data(BATCHES))


def test_ramp_steps_of_an_epoch_stage_is_checked_against_the_steps_per_epoch_before_the_first_batch(tmp_path):
    model = Recorder()
    callback = StageScheduleCallback(stage_schedule=[{"name": "ft", "start_epoch": 0, "end_epoch": 2,
                                                      "ramp_steps": 5}])
    with pytest.raises(StageConfigError, match=r"`ramp_steps` = 5: is longer than the stage \(4 steps: 2 epochs of 2"):
        trainer(tmp_path, max_epochs=2, callbacks=[callback], accumulate_grad_batches=2).fit(model, _data(BATCHES))
    assert model.rows == []
