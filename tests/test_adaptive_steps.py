"""Adaptive stages in optimizer steps: a step stage ends on a plateau seen at a validation (``val_check_interval``
in batches, also inside one long epoch), the next stage starts at the next optimizer step, ``end_step`` stays a
hard cap, resume follows the same transitions, ``restore_best`` loads the stage's own best weights before the next
stage's first step; ``min_steps`` (a change of ``data`` in steps: tests/test_step_data.py)."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import EpochShuffle, PlainStudent, ResumableLoader, TinyNet, trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import Stage, StageConfigError, StageSchedule, StageScheduleCallback
from lightning_stages.cli.main import main

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

EVERY = 2  # a validation every 2 training batches (optimizer steps): at global_step 2, 4, 6, ...
MAX_STEPS = 20


def data(batches: int) -> DataLoader:
    n = batches * 4
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n))
    return ResumableLoader(dataset, batch_size=4, sampler=EpochShuffle(n))


class Scripted(TinyNet):
    """Logs ``val/score`` = ``script[v]`` at the v-th validation (``global_step // EVERY - 1``); writes down, per
    optimizer step, its stage, loss, samples, the weights it started from and the optimizer's state."""

    def __init__(self, script) -> None:
        super().__init__(momentum=0.9)
        self.script = list(script)
        self.stage_of: dict[int, str] = {}
        self.losses: dict[int, float] = {}
        self.samples: dict[int, list[int]] = {}
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer_state: dict[int, int] = {}
        self.at_validation: dict[int, dict[str, torch.Tensor]] = {}

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), batch_size=4)

    def record(self, batch, batch_idx, loss):
        step = self.trainer.global_step
        self.stage_of[step] = self.stage_name
        self.losses[step] = float(loss)
        self.samples[step] = batch[2].tolist()
        self.at_step[step] = {k: v.clone() for k, v in self.state_dict().items()}
        self.optimizer_state[step] = len(self.trainer.optimizers[0].state)

    def validation_step(self, batch, batch_idx):
        step = self.trainer.global_step
        self.at_validation[step] = {k: v.clone() for k, v in self.state_dict().items()}
        self.log("val/score", float(self.script[step // EVERY - 1]))


def fit(tmp_path, model, stages, batches=24, callbacks=(), ckpt_path=None, **kwargs):
    callback = StageScheduleCallback(stages, verbose=False)
    options = {"max_epochs": -1, "max_steps": MAX_STEPS, "val_check_interval": EVERY, "check_val_every_n_epoch": None,
               "deterministic": False, **kwargs}
    trainer(tmp_path, callbacks=[callback, *callbacks], enable_checkpointing=bool(callbacks), **options).fit(
        model, data(batches), ckpt_path=ckpt_path)
    return callback


def plateau_end(values, mode="min", patience=1, min_delta=0.0, min_steps=0, start=0, cap=12):
    """An independent reference: EarlyStopping's rule by hand over the validations at steps EVERY, 2 * EVERY, ...
    whose weights the stage trained (start < step <= cap); the step after the stage's last."""
    best = math.inf if mode == "min" else -math.inf
    wait = 0
    for step in range(EVERY, cap + 1, EVERY):
        if step <= start:
            continue
        value = values[step // EVERY - 1]
        better = value < best - min_delta if mode == "min" else value > best + min_delta
        best, wait = (value, 0) if better else (best, wait + 1)
        if wait >= patience and step - start >= min_steps and step < cap:
            return step
    return cap


def kd_then_ft(**plateau):
    return [{"name": "kd", "start_step": 0, "end_step": 12, "distillation": True, "monitor": "val/score", **plateau},
            {"name": "ft", "start_step": 12, "end_step": 18, "distillation": False}]


# values of the validations at steps 2, 4, 6, ..., 20
DOWN_THEN_FLAT = [5.0, 4.0, 3.0, 3.0, 2.95, 2.9, 1.0, 1.0, 1.0, 1.0]
UP_THEN_FLAT = [1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
ALWAYS_BETTER = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]


@pytest.mark.parametrize(("script", "plateau", "end"), [
    (DOWN_THEN_FLAT, {"patience": 1}, 8),  # 3.0 at step 8 does not improve on 3.0 at step 6
    (DOWN_THEN_FLAT, {"patience": 2}, 12),  # 2.95 and 2.9 improve: the cap (end_step) ends it
    (DOWN_THEN_FLAT, {"patience": 2, "min_delta": 0.1}, 10),  # 2.95 is within min_delta of 3.0
    (UP_THEN_FLAT, {"mode": "max", "patience": 1}, 6),
    (UP_THEN_FLAT, {"mode": "min", "patience": 1}, 4),  # the same values, where lower is better
    (UP_THEN_FLAT, {"mode": "max", "patience": 1, "min_steps": 8}, 8),  # 6 without min_steps
    (ALWAYS_BETTER, {"patience": 1}, 12),  # never a plateau: end_step is a hard cap
])
@pytest.mark.parametrize("batches", [24, 5], ids=["one long epoch", "epochs of 5 batches"])
def test_a_step_stage_ends_at_the_plateau_and_the_next_starts_at_the_next_step(tmp_path, script, plateau, end,
                                                                                batches):
    reference = plateau_end(script, plateau.get("mode", "min"), plateau["patience"], plateau.get("min_delta", 0.0),
                            plateau.get("min_steps", 0))
    assert end == reference
    model = Scripted(script)
    callback = fit(tmp_path, model, kd_then_ft(**plateau), batches=batches)
    # kd until the plateau, ft from the next optimizer step; ft keeps its absolute end (18), the run its length (20)
    assert model.stage_of == {s: "kd" if s < end else "ft" if s < 18 else "base" for s in range(MAX_STEPS)}
    assert callback.adaptive.transitions == ({0: end} if end < 12 else {})


def test_a_validation_inside_an_accumulation_ends_the_stage_after_that_optimizer_step(tmp_path):
    """With 2 batches per optimizer step and a validation every 3 batches, the validation after batch 9 falls inside
    step 4: the stage ends after it (at step 5), so every batch of one optimizer step trains under one stage."""
    stages = [{"name": "kd", "start_step": 0, "end_step": 9, "monitor": "val/score", "patience": 1},
              {"name": "ft", "start_step": 9}]
    seen: list[tuple[int, str]] = []

    class Model(Scripted):
        def record(self, batch, batch_idx, loss):
            seen.append((self.trainer.global_step, self.stage_name))

        def validation_step(self, batch, batch_idx):  # validations after batches 3, 6, 9: steps 1 (inside), 3, 4
            self.log("val/score", {1: 3.0, 3: 2.0, 4: 2.0}.get(self.trainer.global_step, 1.0))

    callback = fit(tmp_path, Model([]), stages, max_steps=10, accumulate_grad_batches=2, val_check_interval=3)
    assert callback.adaptive.transitions == {0: 5}
    assert seen == [(b // 2, "kd" if b // 2 < 5 else "ft") for b in range(20)]


def test_restore_best_loads_the_weights_of_the_stages_best_validation_before_the_next_step(tmp_path):
    script = [5.0, 3.0, 4.0, 4.0, 2.0, 2.5, 1.0, 1.5, 1.2, 1.1]
    stages = [dict(kd_then_ft(patience=2, restore_best=True)[0]),
              {"name": "ft", "start_step": 12, "monitor": "val/score", "restore_best": True}]  # to the run's end
    model = Scripted(script)
    fit(tmp_path, model, stages)
    assert {s: model.stage_of[s] for s in (7, 8)} == {7: "kd", 8: "ft"}  # 4.0 at steps 6 and 8 do not improve on 3.0
    best_kd = min(range(EVERY, 9, EVERY), key=lambda s: script[s // EVERY - 1])
    best_ft = min(range(10, MAX_STEPS + 1, EVERY), key=lambda s: script[s // EVERY - 1])
    assert (best_kd, best_ft) == (4, 14)  # ft's own best; kd's best is never carried over
    for key, value in model.at_validation[best_kd].items():
        assert torch.equal(model.at_step[8][key], value), key  # ft's first step starts from kd's best
    for key, value in model.at_validation[best_ft].items():
        assert torch.equal(model.state_dict()[key], value), key  # max_steps ended ft: its best, restored at the end
    assert not torch.equal(model.at_validation[8]["head.weight"], model.at_step[8]["head.weight"])
    assert not torch.equal(model.at_validation[20]["head.weight"], model.state_dict()["head.weight"])
    # the optimizer's momentum was gathered on the discarded weights: reset at the restore, kept elsewhere
    assert {s: model.optimizer_state[s] for s in (7, 8, 9, 19)} == {7: 4, 8: 0, 9: 4, 19: 4}


def test_the_validation_at_a_stage_s_cap_belongs_to_the_stage(tmp_path):
    """The validation at step 12 sees the weights of kd's last step (11): it is kd's (its best here), not ft's."""
    model = Scripted(ALWAYS_BETTER)
    fit(tmp_path, model, [dict(kd_then_ft()[0], restore_best=True), kd_then_ft()[1]])
    for key, value in model.at_validation[12].items():
        assert torch.equal(model.at_step[12][key], value), key
    assert not torch.equal(model.at_validation[10]["head.weight"], model.at_step[12]["head.weight"])
    assert (model.optimizer_state[11], model.optimizer_state[12]) == (4, 0)  # restored (to the same weights) at 12


def test_a_plateau_of_the_run_s_last_stage_ends_the_run_with_its_best_weights(tmp_path):
    stages = [{"name": "kd", "start_step": 0, "end_step": 4, "distillation": True},
              {"name": "ft", "start_step": 4, "monitor": "val/score", "patience": 1, "restore_best": True}]
    model = Scripted(DOWN_THEN_FLAT)
    at_validation = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}",
                                    save_on_train_epoch_end=False)
    fit(tmp_path, model, stages, callbacks=[at_validation])
    assert model.stage_of == {s: "kd" if s < 4 else "ft" for s in range(8)}  # 3.0 at step 8: stop, nothing follows
    for key, value in model.at_validation[6].items():
        assert torch.equal(model.state_dict()[key], value), key
    # resumed from the checkpoint of that validation (before the restore): it restores and stops again, untrained
    resumed = Scripted(DOWN_THEN_FLAT)
    fit(tmp_path / "resumed", resumed, stages, ckpt_path=tmp_path / "ckpt" / "step=8.ckpt")
    assert resumed.stage_of == {}
    for key, value in model.at_validation[6].items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_run_stopped_by_early_stopping_inside_a_restore_best_step_stage_keeps_its_last_weights(tmp_path):
    """As in a schedule in epochs: only the stage's own end (its cap, a plateau, the run's end) restores its best."""
    stages = [{"name": "kd", "start_step": 0, "end_step": 12, "monitor": "val/score", "restore_best": True},
              {"name": "ft", "start_step": 12, "end_step": 20}]
    model = Scripted([5.0, 3.0, 4.0, 4.0, 4.0, 4.0])  # best at step 4; no improvement at 6 and 8: EarlyStopping stops
    fit(tmp_path, model, stages, callbacks=[EarlyStopping("val/score", patience=2, check_on_train_epoch_end=False)])
    assert sorted(model.at_validation) == [2, 4, 6, 8] and max(model.stage_of) == 7  # stopped inside kd
    for key, value in model.at_validation[8].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in model.at_validation[4].items())


# ---------------------------------------------------------------------------------------------- resume

RESUMED = [dict(kd_then_ft(patience=1, restore_best=True)[0]),
           dict(kd_then_ft()[1], monitor="val/score", patience=2, restore_best=True)]


class SaveAt(pl.Callback):
    """A checkpoint at the end of these optimizer steps (no validation is due there: they are odd)."""

    def __init__(self, directory, steps) -> None:
        self.directory, self.steps = directory, set(steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.directory / f"batch-step={trainer.global_step}.ckpt")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The uninterrupted run in one long epoch (kd ends on a plateau at step 8), with a checkpoint at every
    validation's end and at the end of steps 5 and 9."""
    root = tmp_path_factory.mktemp("whole")
    model = Scripted(DOWN_THEN_FLAT)
    at_validation = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="val-{step}",
                                    save_on_train_epoch_end=False)
    callback = fit(root, model, RESUMED, callbacks=[at_validation, SaveAt(root / "ckpt", (5, 9))])
    assert callback.adaptive.transitions == {0: 8}
    return model, root / "ckpt"


@pytest.mark.parametrize("checkpoint", ["batch-step=5", "val-step=6", "val-step=8", "batch-step=9", "val-step=14"],
                         ids=["before, mid-epoch", "before, at a validation", "at the transition",
                              "after, mid-epoch", "after, ft's best kept"])
def test_resume_follows_the_same_transitions_weights_and_losses(tmp_path, whole_run, checkpoint):
    whole, ckpt = whole_run
    resumed = Scripted(DOWN_THEN_FLAT)
    callback = fit(tmp_path, resumed, RESUMED, ckpt_path=ckpt / f"{checkpoint}.ckpt")
    start = int(checkpoint.split("=")[1])
    assert min(resumed.stage_of) == start
    assert callback.adaptive.transitions == {0: 8}
    assert resumed.stage_of == {s: whole.stage_of[s] for s in range(start, MAX_STEPS)}
    for step in range(start, MAX_STEPS):
        assert resumed.samples[step] == whole.samples[step], step
        assert resumed.losses[step] == pytest.approx(whole.losses[step], abs=1e-6, rel=0), step
        assert resumed.optimizer_state[step] == whole.optimizer_state[step], step
    for key, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6, rtol=0), key
    # ft's best (1.0 at step 14, 16 and 18 do not improve) is the same tracker value, seen at the same step
    assert (callback.adaptive.tracker.best, callback.adaptive.tracker.best_epoch) == (1.0, 14)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(("stage", "message"), [
    ({"min_steps": 13}, r"`min_steps` = 13: is longer than the stage, which has 12 steps \(\[0, 12\)\)"),
    ({"min_steps": -1}, r"`min_steps` = -1: must be an integer >= 0"),
    ({"min_steps": 2.5}, r"`min_steps` = 2.5: must be an integer >= 0"),
    ({"min_epochs": 2}, r"`min_epochs` = 2: counts epochs, but this stage counts optimizer steps; give `min_steps`"),
    ({"min_steps": 2, "patience": None}, r"`min_steps` = 2: has no effect without `patience`"),
    ({"min_steps": 2, "monitor": None, "patience": None}, r"`min_steps` = 2: needs `monitor`"),
])
def test_bad_min_steps_names_stage_field_and_value(stage, message):
    given = {k: v for k, v in {**kd_then_ft(patience=1)[0], **stage}.items() if v is not None}
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\): " + message):
        StageScheduleCallback([given, kd_then_ft()[1]])


def test_min_steps_on_an_epoch_stage_says_to_use_min_epochs():
    stage = {"name": "kd", "start_epoch": 0, "end_epoch": 5, "monitor": "val/score", "patience": 1, "min_steps": 3}
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\): `min_steps` = 3: counts steps, but this stage "
                                               r"counts epochs; give `min_epochs`"):
        StageSchedule([stage])


def test_min_steps_of_a_stage_that_runs_to_the_end_is_checked_against_max_steps(tmp_path):
    stages = [{"name": "ft", "start_step": 4, "monitor": "val/score", "patience": 1, "min_steps": 17}]
    model = Scripted(ALWAYS_BETTER)
    with pytest.raises(StageConfigError, match=r"stage 0 \('ft'\): `min_steps` = 17: is longer than the stage, "
                                               r"which has 16 steps \(\[4, 20\)\)"):
        fit(tmp_path, model, stages)
    assert model.stage_of == {}


# ---------------------------------------------------------------------------------------------- seed JSON, YAML, show

STEP_STAGES = [
    {"name": "distill", "start_step": 0, "end_step": 600, "distillation": True, "monitor": "val/score",
     "patience": 2, "min_steps": 200, "restore_best": True},
    {"name": "finetune", "start_step": 600, "end_step": 900},
]


def test_seed_json_and_show_print_steps_up_to_the_cap(tmp_path, capsys):
    path = tmp_path / "seed.json"
    path.write_text(json.dumps({"stage_schedule": STEP_STAGES, "train": {"max_steps": 1000}}))
    schedule = StageSchedule.from_config(path)
    assert schedule.stages[0].min_steps == 200 and StageSchedule.from_config(schedule.to_dict()) == schedule
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(distill [0, up to 600), finetune [up to 600, 900), base [900, 1000))" in out
    assert [line.split()[:6] for line in out.splitlines()[2:4]] == [
        ["[0,", "up", "to", "600)", "distill", "(1/2)"], ["[up", "to", "600,", "900)", "finetune", "(2/2)"]]


def test_show_checkpoint_prints_the_steps_the_run_took(tmp_path, whole_run, capsys):
    _, ckpt = whole_run
    assert main(["show", "--checkpoint", str(ckpt / "val-step=20.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "2 stages over 20 steps (kd [0, 8), ft [8, up to 18), base [up to 18, 20))" in out
    assert "stage 0 ('kd'): ended at step 8 on a plateau of val/score (cap 12)" in out
    assert "stage 1 ('ft'): no early end (yet): runs up to 18; best 1 at step 14" in out
    assert main(["show", "--checkpoint", str(ckpt / "val-step=6.ckpt")]) == 0
    assert "runs up to 12; best 3 at step 6, 0 validation run(s) since" in capsys.readouterr().out


def test_lightning_cli_yaml_types_min_steps(tmp_path, capsys):
    def config(stages):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"trainer": {"max_steps": 1000, "max_epochs": -1, "callbacks": [
            {"class_path": "lightning_stages.StageScheduleCallback", "init_args": {"stage_schedule": stages}}]}}))
        return ["--config", str(path), "--trainer.logger=false", "--trainer.enable_checkpointing=false"]

    cli = LightningCLI(PlainStudent, run=False, args=config(STEP_STAGES))
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, StageScheduleCallback)]
    assert callback.schedule.stages == tuple(Stage(**stage) for stage in STEP_STAGES)
    with pytest.raises(SystemExit):
        LightningCLI(PlainStudent, run=False, args=config([dict(STEP_STAGES[0], min_steps="many"), STEP_STAGES[1]]))
    assert "min_steps" in capsys.readouterr().err
