"""Stages in optimizer steps: a stage takes effect from the first batch whose ``trainer.global_step`` is in its range,
teachers and hooks follow it exactly there, every rule of epochs carries over, and a run resumed from a step
checkpoint (mid-ramp included) trains exactly like the run that never stopped."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FIVE_WEIGHTS, Crash, CrashAtStep, EpochShuffle, ResumableLoader, Student, TinyNet, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageConfigError, StageSchedule, StageScheduleCallback
from lightning_stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

KD_THEN_FT = [
    {"name": "kd", "start_step": 0, "end_step": 6, "distillation": True, "lambda_coef": 1.0,
     "loss_weights": {"cls": 0.0}},
    {"name": "ft", "start_step": 6, "distillation": False},
]


class Hooked(TinyNet):
    """Records, per batch, the step, the stage, and whether the teacher ran and the feature hook was attached."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple] = []

    def configure_feature_hooks(self):
        return {"student": ["body"]}

    def distill_losses(self, logits, x):
        self._teacher_ran = bool(self.run_teachers(x))
        return super().distill_losses(logits, x)

    def record(self, batch, batch_idx, loss):
        t = self.trainer
        self.rows.append((t.current_epoch, batch_idx, t.global_step, self.stage_name, self.use_distillation,
                          self._teacher_ran, len(self.body._forward_hooks)))


def _data(batches: int, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = batches * batch_size
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=batch_size)


@pytest.mark.parametrize("batches_per_epoch", [24, 4], ids=["one long epoch", "several epochs"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_step_stage_begins_at_its_step_with_max_steps_and_max_epochs_minus_one(tmp_path, batches_per_epoch,
                                                                                 accumulate):
    model = Hooked()
    fit = trainer(tmp_path, max_epochs=-1, max_steps=10, accumulate_grad_batches=accumulate,
                  callbacks=[StageScheduleCallback(stage_schedule=KD_THEN_FT, verbose=False)])
    fit.fit(model, _data(batches_per_epoch))
    assert fit.global_step == 10 and len(model.rows) == 10 * accumulate
    if batches_per_epoch == 24:
        assert {row[0] for row in model.rows} == {0}  # one epoch, cut by max_steps
    for epoch, batch_idx, step, stage, distill, teacher_ran, hooks in model.rows:
        assert step == (epoch * batches_per_epoch + batch_idx) // accumulate
        kd = step < 6
        # every batch of one optimizer step sees the same stage; teacher and hook exactly while kd runs
        assert (stage, distill, teacher_ran, hooks) == (("kd", True, True, 1) if kd else ("ft", False, False, 0))


def test_uncovered_steps_and_a_stage_cut_short_warn_in_steps(tmp_path):
    stages = [{"name": "late", "start_step": 2, "end_step": 20, "distillation": True}]
    with pytest.warns(UserWarning) as record:
        trainer(tmp_path, max_epochs=-1, max_steps=4,
                callbacks=[StageScheduleCallback(stage_schedule=stages, verbose=False)]).fit(Hooked(), _data(8))
    messages = [str(w.message) for w in record]
    assert any("no stage covers steps [0, 2); they run with the base settings" in m for m in messages)
    assert any("stage 0 ('late') ends at step 20 but the Trainer stops at max_steps=4; it is cut short" in m
               for m in messages)


def test_a_stage_starting_at_or_after_max_steps_is_refused_at_setup(tmp_path):
    stages = [{"name": "kd", "start_step": 0, "end_step": 4, "distillation": True}, {"name": "never", "start_step": 10}]
    model = Hooked()
    with pytest.raises(StageConfigError, match=r"stage 1 \('never'\): `start_step` = 10: starts at or beyond "
                                               r"max_steps \(10\), so it would never run"):
        trainer(tmp_path, max_epochs=-1, max_steps=10,
                callbacks=[StageScheduleCallback(stage_schedule=stages)]).fit(model, _data(4))
    assert model.rows == []


@pytest.mark.parametrize(("accumulate", "reached"), [(1, 8), (3, 4)])  # 2 epochs of ceil(4 / accumulate) steps
def test_a_step_stage_that_max_epochs_alone_never_reaches_is_refused_before_the_first_batch(tmp_path, accumulate,
                                                                                          reached):
    # no max_steps: the run ends after max_epochs, and a stage in steps beyond it would never run, without a word
    stages = [{"name": "kd", "start_step": 0, "end_step": 2, "distillation": True}, {"name": "never", "start_step": 8}]
    model = Hooked()
    fit = trainer(tmp_path, max_epochs=2, accumulate_grad_batches=accumulate,
                  callbacks=[StageScheduleCallback(stage_schedule=stages, verbose=False)])
    with pytest.raises(StageConfigError, match=re.escape(
            f"stage 1 ('never'): `start_step` = 8: starts at or after the run's last optimizer step: the Trainer stops "
            f"after max_epochs=2 epochs of {reached // 2} optimizer steps ({reached} steps; no max_steps is set), so it "
            "would never run; set the Trainer's max_steps, or raise max_epochs")):
        fit.fit(model, _data(4))
    assert model.rows == []
    stages[1]["start_step"] = reached - 1  # its last step: it runs
    fit = trainer(tmp_path, max_epochs=2, accumulate_grad_batches=accumulate,
                  callbacks=[StageScheduleCallback(stage_schedule=stages, verbose=False)])
    with pytest.warns(UserWarning, match="no stage covers"):  # steps 2 .. reached - 2
        fit.fit(model, _data(4))
    assert model.rows[-1][3] == "never" and fit.global_step == reached


def test_an_omitted_end_step_means_max_steps(tmp_path):
    callback = StageScheduleCallback(stage_schedule=KD_THEN_FT, verbose=False)
    trainer(tmp_path, max_epochs=-1, max_steps=7, callbacks=[callback]).fit(Hooked(), _data(4))
    assert [(r.name, r.start_epoch, r.end_epoch, r.unit) for r in callback.resolved_schedule.timeline()] == [
        ("kd", 0, 6, "step"), ("ft", 6, 7, "step")]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"name": "a", "start_epoch": 0, "end_epoch": 2}, {"name": "b", "start_step": 50}],
         "stage 1 ('b'): `start_step` = 50: this schedule counts in epochs (stage 0 ('a') gives `start_epoch`); "
         "one schedule uses one unit"),
        ([{"name": "a", "start_step": 0, "end_step": 10}, {"name": "b", "start_step": 5}],
         "stage 1 ('b'): `start_step` = 5: overlaps stage 0 ('a') which covers steps [0, 10)"),
        ([{"start_epoch": 0, "start_step": 0}],
         "stage 0: `start_step` = 0: a stage counts in epochs or in steps, not both; give `start_epoch` or "
         "`start_step`"),
        ([{"start_step": 5, "end_step": 5}], "stage 0: `end_step` = 5: must be greater than `start_step` (5)"),
        ([{"start_step": -1}], "stage 0: `start_step` = -1: must be >= 0"),
        ([{"start_step": 1.5}], "stage 0: `start_step` = 1.5: must be an integer, not float"),
        ([{"end_step": 5}], "stage 0: `start_step` = None: is required"),
        ([{"name": "x"}], "stage 0 ('x'): `start_epoch` = None: is required"),
    ],
)
def test_every_step_error_names_stage_field_and_value(stages, message):
    with pytest.raises(StageConfigError) as info:
        StageSchedule(stages)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------- resume to the step

N_SAMPLES, BATCH_SIZE = 32, 8  # 4 batches per epoch
SCHEDULES = {
    "steps": ([
        {"name": "kd", "start_step": 0, "end_step": 6, "distillation": True, "loss_weights": {"cls": 0.0}},
        {"name": "joint", "start_step": 6, "end_step": 14, "distillation": True, "lambda_coef": 0.5,
         "ramp_steps": 4, "ramp_shape": "cosine"},
        {"name": "ft", "start_step": 14, "distillation": False, "ramp_steps": 3},
    ], {"max_steps": 20, "max_epochs": -1}),
    "epochs": ([
        {"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True, "loss_weights": {"cls": 0.0}},
        {"name": "ft", "start_epoch": 2, "distillation": False, "ramp_epochs": 2},
    ], {"max_epochs": 5}),
}


@dataclass(frozen=True)
class Step:
    epoch: int
    batch_idx: int
    step: int
    stage: str
    distillation: bool
    lambda_coef: float
    weights: tuple
    loss: float
    samples: tuple


class Net(TinyNet):
    def __init__(self) -> None:
        super().__init__(momentum=0.9)  # the optimizer's state resumes too
        self.steps: list[Step] = []

    def record(self, batch, batch_idx, loss):
        self.steps.append(Step(self.current_epoch, batch_idx, self.trainer.global_step, self.stage_name,
                               self.use_distillation, self.lambda_coef, tuple(sorted(self.loss_weights.items())),
                               loss.item(), tuple(batch[2].tolist())))



def _loader(resumable: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N_SAMPLES, 4, generator=g), torch.randint(0, 3, (N_SAMPLES,), generator=g),
                         torch.arange(N_SAMPLES))
    return (ResumableLoader if resumable else DataLoader)(data, batch_size=BATCH_SIZE, sampler=EpochShuffle(N_SAMPLES))


def _fit(tmp_path, kind: str, model: Net, callbacks=(), **kwargs) -> None:
    stages, limits = SCHEDULES[kind]
    callback = StageScheduleCallback(stage_schedule=stages, verbose=False)
    trainer(tmp_path, callbacks=[callback, *callbacks], deterministic=False,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **limits).fit(
        model, kwargs.pop("data", None) or _loader(), **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, dict[tuple[int, int], Step]]:
    out = {}
    for kind in SCHEDULES:
        model = Net()
        _fit(tmp_path_factory.mktemp(kind), kind, model)
        out[kind] = {(s.epoch, s.batch_idx): s for s in model.steps}
    return out


@pytest.mark.parametrize(
    ("kind", "stop", "resumable", "where"),
    [
        ("steps", 8, True, "mid-ramp of joint (step 8 of [6, 10)), at an epoch boundary"),
        ("steps", 9, True, "mid-ramp of joint, mid-epoch"),
        ("steps", 14, True, "at the step boundary joint -> ft, mid-epoch"),
        ("steps", 15, False, "mid-ramp of ft, plain loader: the data differs, the values do not"),
        ("epochs", 10, True, "mid-ramp of an epoch ramp, mid-epoch"),
    ],
)
def test_resumed_from_a_step_checkpoint_equals_the_uninterrupted_run(tmp_path, uninterrupted, kind, stop, resumable,
                                                                      where):
    ckpt_dir = tmp_path / "ckpt"
    first = Net()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=stop, save_top_k=-1)
    with pytest.raises(Crash):
        _fit(tmp_path, kind, first, [checkpoint, CrashAtStep(stop)], data=_loader(resumable))
    (ckpt,) = [p for p in ckpt_dir.iterdir() if p.name.endswith(f"step={stop}.ckpt")]
    second = Net()
    _fit(tmp_path, kind, second, data=_loader(resumable), ckpt_path=ckpt)
    reference = uninterrupted[kind]
    assert [(s.epoch, s.batch_idx) for s in first.steps + second.steps] == sorted(reference), where
    assert second.steps[0].step == stop
    for s in first.steps + second.steps:
        ref = reference[(s.epoch, s.batch_idx)]
        assert (s.step, s.stage, s.distillation, s.lambda_coef, s.weights) == (
            ref.step, ref.stage, ref.distillation, ref.lambda_coef, ref.weights), (where, s.epoch, s.batch_idx)
        if resumable:
            assert s.samples == ref.samples and s.loss == pytest.approx(ref.loss, abs=1e-6, rel=0), (where, s.step)
    # the resumed run goes through a ramp: coefficients between the stages' own (1.0, 0.5, and 0 when off)
    assert any(0 < s.lambda_coef < 1 and s.lambda_coef != 0.5 for s in second.steps)


# ---------------------------------------------------------------------------------------------- seed JSON, YAML, show

def test_step_schedule_from_seed_json_and_show(tmp_path, capsys):
    config = tmp_path / "steps.json"
    config.write_text(json.dumps({
        "train": {"max_steps": 300, "loss_weights": {"cls": 1.0}},
        "distillation": {"lambda_coef": 1.0},
        "stage_schedule": [
            {"name": "distill", "start_step": 0, "end_step": 100, "distillation": True, "loss_weights": {"cls": 0}},
            {"name": "finetune", "start_step": 100, "distillation": False, "ramp_steps": 40, "ramp_shape": "cosine"},
        ],
    }))
    schedule = StageSchedule.from_config(config)
    assert (schedule.unit, schedule.total_steps) == ("step", 300)
    assert StageSchedule.from_config(schedule.to_dict()) == schedule  # the checkpoint form round-trips
    assert main(["show", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "steps       stage           distillation  lambda  cls     ramp",
        "[0, 100)    distill (1/2)   on            1       0",
        "[100, 300)  finetune (2/2)  on -> off     1 -> 0  0 -> 1  cosine, 40 steps",
    ]


def test_step_stages_from_lightning_cli_yaml_are_validated_by_the_parser(tmp_path, capsys):
    stages = [{"name": "kd", "start_step": 0, "end_step": 2, "distillation": True, "loss_weights": {"cls": 0}},
              {"name": "ft", "start_step": 2, "ramp_steps": 2, "ramp_shape": "cosine"}]
    config = {"trainer": {"max_steps": 5, "max_epochs": -1, "logger": False, "enable_checkpointing": False,
                          "enable_progress_bar": False, "enable_model_summary": False,
                          "default_root_dir": str(tmp_path),
                          "callbacks": [{"class_path": "lightning_stages.StageScheduleCallback",
                                         "init_args": {"stage_schedule": stages}}]}}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config))
    cli = LightningCLI(Student, run=False, args=["--config", str(good)])
    cli.trainer.fit(cli.model, loader(n=8, batch_size=2))
    assert [row[1] for row in cli.model.seen] == ["kd", "kd", "ft", "ft", "ft"]
    assert cli.model.seen[2][4]["cls"] == 0.0 and cli.model.seen[4][4]["cls"] == FIVE_WEIGHTS["cls"]
    stages[1]["ramp_steps"] = "two"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        LightningCLI(Student, run=False, args=["--config", str(bad)])
    assert "ramp_steps" in capsys.readouterr().err


def test_the_shipped_step_config_validates_and_shows_as_the_readme_says(capsys):
    config = ROOT / "configs" / "steps_distill_ramp_finetune.json"
    assert main(["validate", str(config)]) == 0
    capsys.readouterr()
    assert main(["show", str(config)]) == 0
    readme = (ROOT / "README.md").read_text()
    for line in capsys.readouterr().out.splitlines()[1:]:
        assert line in readme, line
    schedule = StageSchedule.from_config(config)
    # the README's step-by-step table: the cosine ramp over steps [900, 1200), by hand
    for step, p in ((975, 0.25), (1050, 0.5)):
        s = (1 - math.cos(math.pi * p)) / 2
        got = schedule.at_step(step)
        assert (got.distillation, got.lambda_coef, got.loss_weights["focal"]) == (
            True, pytest.approx(1 - s), pytest.approx(15 * s))
    assert (schedule.at_step(1200).distillation, schedule.at_step(1200).loss_weights["focal"]) == (False, 15.0)
