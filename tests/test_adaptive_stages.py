"""Plateau-ended stages and ``restore_best``: a stage that ends when its metric stops improving, the next stage right
after it, resume that follows the same transitions, and the stage's own best weights loaded at its end."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import TinyNet, trainer
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import StageConfigError, StageSchedule, StageScheduleCallback


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=4)


class Scripted(TinyNet):
    """Logs ``val/score`` = ``script[epoch]`` at each validation; writes down each epoch's stage and weights."""

    def __init__(self, script, momentum: float = 0.0) -> None:
        super().__init__(momentum=momentum)
        self.script = list(script)
        self.stage_of: dict[int, str] = {}
        self.losses: list[float] = []
        self.at_validation: dict[int, dict[str, torch.Tensor]] = {}
        self.at_epoch_start: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer_state: dict[int, int] = {}  # epoch -> number of parameters with optimizer state

    def train_dataloader(self):
        return data(8, 0)

    def val_dataloader(self):
        return data(4, 1)

    def on_train_epoch_start(self):
        self.at_epoch_start[self.current_epoch] = {k: v.clone() for k, v in self.state_dict().items()}
        self.optimizer_state[self.current_epoch] = len(self.trainer.optimizers[0].state)

    def record(self, batch, batch_idx, loss):
        self.stage_of[self.current_epoch] = self.stage_name
        self.losses.append(float(loss))

    def validation_step(self, batch, batch_idx):
        self.at_validation[self.current_epoch] = {k: v.clone() for k, v in self.state_dict().items()}
        self.log("val/score", float(self.script[self.current_epoch]))


def plateau_end(values, mode="min", patience=1, min_delta=0.0, min_epochs=1, start=0, cap=None):
    """An independent reference: EarlyStopping's rule written out by hand; the epoch after the stage's last."""
    best = math.inf if mode == "min" else -math.inf
    wait = 0
    for epoch in range(start, cap):
        value = values[epoch]
        better = value < best - min_delta if mode == "min" else value > best + min_delta
        best, wait = (value, 0) if better else (best, wait + 1)
        if wait >= patience and epoch + 1 - start >= min_epochs:
            return epoch + 1
    return cap


def two_stages(**plateau):
    return [{"name": "kd", "start_epoch": 0, "end_epoch": 6, "distillation": True, "monitor": "val/score",
             **plateau},
            {"name": "ft", "start_epoch": 6, "end_epoch": 9, "distillation": False}]


DOWN_THEN_FLAT = [5.0, 4.0, 3.0, 3.0, 2.95, 2.9, 1.0, 1.0, 1.0, 1.0]
UP_THEN_FLAT = [1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
ALWAYS_BETTER = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]


@pytest.mark.parametrize(("script", "plateau", "end"), [
    (DOWN_THEN_FLAT, {"patience": 1}, 4),  # 3.0 at epoch 3 does not improve on 3.0
    (DOWN_THEN_FLAT, {"patience": 2}, 6),  # 2.95 improves: the cap ends it
    (DOWN_THEN_FLAT, {"patience": 2, "min_delta": 0.1}, 5),  # 2.95 and 2.9 are within min_delta of 3.0
    (UP_THEN_FLAT, {"mode": "max", "patience": 1}, 3),
    (UP_THEN_FLAT, {"mode": "min", "patience": 1}, 2),  # the same values, where lower is better
    (UP_THEN_FLAT, {"mode": "max", "patience": 1, "min_epochs": 4}, 4),  # 3 without min_epochs
    (ALWAYS_BETTER, {"patience": 1}, 6),  # never a plateau: end_epoch is a hard cap
])
def test_a_stage_ends_at_the_plateau_and_the_next_starts_right_after(tmp_path, script, plateau, end):
    reference = plateau_end(script, plateau.get("mode", "min"), plateau["patience"], plateau.get("min_delta", 0.0),
                            plateau.get("min_epochs", 1), 0, 6)
    assert end == reference
    model = Scripted(script)
    callback = StageScheduleCallback(two_stages(**plateau), verbose=False)
    trainer(tmp_path, max_epochs=10, callbacks=[callback]).fit(model)
    # kd until the plateau, ft right after; ft keeps its absolute end (9), so the run's length is unchanged
    assert model.stage_of == {e: "kd" if e < end else "ft" if e < 9 else "base" for e in range(10)}
    assert callback.adaptive.transitions == ({0: end} if end < 6 else {})


class ScriptedData(Scripted):
    """Trains on 8 samples for ``stage_data == "all"`` and 4 for ``"labelled"``; writes down every build."""

    def __init__(self, script) -> None:
        super().__init__(script)
        self.builds: list[tuple[int, str]] = []
        self.batches: dict[int, int] = {}

    def train_dataloader(self):
        self.builds.append((self.trainer.current_epoch, self.stage_data))
        return data(8 if self.stage_data == "all" else 4, 0)

    def record(self, batch, batch_idx, loss):
        super().record(batch, batch_idx, loss)
        self.batches[self.current_epoch] = self.batches.get(self.current_epoch, 0) + 1


def test_the_data_changes_where_the_plateau_ended_the_stage(tmp_path):
    model = ScriptedData(DOWN_THEN_FLAT)
    stages = [dict(two_stages(patience=1)[0], data="all"), dict(two_stages()[1], data="labelled")]
    trainer(tmp_path, max_epochs=9, callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(model)
    assert model.builds == [(0, "all"), (4, "labelled")]  # kd ended after epoch 3, not at its cap (6)
    assert model.batches == {e: 2 if e < 4 else 1 for e in range(9)}


def test_a_plateau_of_the_last_stage_ends_the_run(tmp_path):
    model = Scripted(DOWN_THEN_FLAT)
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True},
              {"name": "ft", "start_epoch": 2, "monitor": "val/score", "patience": 1}]
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, max_epochs=10, enable_checkpointing=True,
            callbacks=[StageScheduleCallback(stages, verbose=False), checkpoints]).fit(model)
    assert model.stage_of == {0: "kd", 1: "kd", 2: "ft", 3: "ft"}  # 3.0 at epoch 3: no improvement, nothing follows
    # a run resumed from its last checkpoint stops again: it does not train the base settings to max_epochs
    resumed = Scripted(DOWN_THEN_FLAT)
    trainer(tmp_path / "resumed", max_epochs=10, callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(
        resumed, ckpt_path=tmp_path / "ckpt" / "epoch=3.ckpt")
    assert resumed.stage_of == {}


def test_a_plateau_of_the_last_stage_cut_by_max_epochs_ends_the_run(tmp_path):
    # the stage's end_epoch lies past the run's end (max_epochs cuts it, with a warning): it runs to the run's end,
    # and a plateau ends the run as above; the base settings were trained to max_epochs
    model = Scripted(DOWN_THEN_FLAT)
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "distillation": True},
              {"name": "ft", "start_epoch": 2, "end_epoch": 30, "monitor": "val/score", "patience": 1}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, max_epochs=10, callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(model)
    assert model.stage_of == {0: "kd", 1: "kd", 2: "ft", 3: "ft"}


def test_resume_after_two_plateaus_in_a_row_keeps_both(tmp_path):
    # B starts where A's plateau ended it (epoch 2, not 6), so B's own plateau end (4) lies before B's written start:
    # a resumed run dropped it as "not inside the stage [6, 10)" and trained B again instead of C
    script = [1.0] * 12  # no validation improves on the first: each stage ends after its second epoch
    stages = [{"name": "A", "start_epoch": 0, "end_epoch": 6, "monitor": "val/score", "patience": 1},
              {"name": "B", "start_epoch": 6, "end_epoch": 10, "monitor": "val/score", "patience": 1},
              {"name": "C", "start_epoch": 10, "end_epoch": 12}]
    end_a = plateau_end(script, patience=1, start=0, cap=6)
    end_b = plateau_end(script, patience=1, start=end_a, cap=10)
    whole = Scripted(script)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, max_epochs=12, enable_checkpointing=True,
            callbacks=[StageScheduleCallback(stages, verbose=False), checkpoints]).fit(whole)
    assert whole.stage_of == {e: "A" if e < end_a else "B" if e < end_b else "C" for e in range(12)}
    resumed = Scripted(script)
    callback = StageScheduleCallback(stages, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "resumed", max_epochs=12, callbacks=[callback]).fit(
            resumed, ckpt_path=tmp_path / "ckpt" / "epoch=5.ckpt")
    assert not [w for w in caught if "transitions" in str(w.message)]  # "... are dropped"
    assert callback.adaptive.transitions == {0: end_a, 1: end_b}
    assert resumed.stage_of == dict.fromkeys(range(6, 12), "C")
    assert resumed.losses == whole.losses[2 * 6:]


def test_a_monitor_never_logged_is_named_with_what_was_logged(tmp_path):
    model = Scripted(DOWN_THEN_FLAT)
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 6, "monitor": "val/scor", "patience": 1}]
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\): `monitor` = 'val/scor': was not logged by the end "
                                               r"of the stage's first validation; did you mean `val/score`\? the "
                                               r"logged metrics are: val/score"):
        trainer(tmp_path, max_epochs=10, callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(model)
    assert model.stage_of == {0: "kd"}  # raised at the first validation, at the end of epoch 0


def finish(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


RESUMED_STAGES = two_stages(patience=1, restore_best=True)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The uninterrupted run (kd ends on a plateau after epoch 3), with a checkpoint at every epoch's end."""
    root = tmp_path_factory.mktemp("whole")
    model = Scripted(DOWN_THEN_FLAT)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(root, max_epochs=10, enable_checkpointing=True, callbacks=[
        StageScheduleCallback(RESUMED_STAGES, verbose=False), checkpoints]).fit(model)
    assert model.stage_of[3] == "kd" and model.stage_of[4] == "ft"
    return model, root / "ckpt"


@pytest.mark.parametrize("resume_after", [2, 3, 4])  # before, at and after the transition (kd ends after epoch 3)
def test_resume_follows_the_same_transitions_weights_and_losses(tmp_path, whole_run, resume_after):
    whole, ckpt = whole_run
    resumed = Scripted(DOWN_THEN_FLAT)
    callback = StageScheduleCallback(RESUMED_STAGES, verbose=False)
    trainer(tmp_path, max_epochs=10, callbacks=[callback]).fit(resumed, ckpt_path=ckpt / f"epoch={resume_after}.ckpt")
    assert callback.adaptive.transitions == {0: 4}
    assert resumed.stage_of == {e: s for e, s in whole.stage_of.items() if e > resume_after}
    steps_before = 2 * (resume_after + 1)
    assert resumed.losses == whole.losses[steps_before:]
    for key, value in finish(whole).items():
        assert torch.equal(finish(resumed)[key], value), key


class WithScheduler(Scripted):
    """SGD with momentum and a StepLR that halves the learning rate every epoch; writes down each epoch's rate."""

    def __init__(self, script) -> None:
        super().__init__(script, momentum=0.9)
        self.lr_of: dict[int, float] = {}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.lr_of[self.current_epoch] = self.trainer.optimizers[0].param_groups[0]["lr"]

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def test_restore_best_loads_the_weights_of_the_stages_best_validation(tmp_path):
    script = [5.0, 3.0, 4.0, 4.0, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8]  # kd's best is epoch 1; epoch 4 is ft's, not kd's
    model = WithScheduler(script)
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 6, "distillation": True, "monitor": "val/score",
               "patience": 2, "restore_best": True},
              {"name": "ft", "start_epoch": 6, "end_epoch": 10, "monitor": "val/score", "restore_best": True}]
    trainer(tmp_path, max_epochs=10, callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(model)
    assert model.stage_of[3] == "kd" and model.stage_of[4] == "ft"  # epochs 2 and 3 did not improve on 3.0
    best_kd = min(range(4), key=lambda e: script[e])
    for key, value in model.at_validation[best_kd].items():
        assert torch.equal(model.at_epoch_start[4][key], value), key
    # ft's own best (epoch 6), though epoch 4 of the run's history was never better than kd's in kd
    best_ft = min(range(4, 10), key=lambda e: script[e])
    for key, value in model.at_validation[best_ft].items():
        assert torch.equal(model.state_dict()[key], value), key
    # the optimizer's momentum was gathered on the discarded weights: reset at the restore, kept elsewhere
    assert model.optimizer_state[4] == 0
    assert model.optimizer_state[3] == len(list(model.parameters()))
    # the LR schedule follows the run's epochs, restore or not
    assert model.lr_of == {e: pytest.approx(model.lr * 0.5**e, rel=1e-12) for e in range(10)}


def test_restore_best_when_max_steps_ends_an_epoch_schedule(tmp_path):
    # max_steps ends the run inside the stage, at the end of epoch 2, as max_epochs=3 would: the best is restored
    script = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]  # the best is epoch 0's
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 10, "monitor": "val/score", "restore_best": True}]
    for limits in ({"max_epochs": 3}, {"max_epochs": 10, "max_steps": 6}):  # 2 batches an epoch
        model = Scripted(script)
        trainer(tmp_path, callbacks=[StageScheduleCallback(stages, verbose=False)], **limits).fit(model)
        assert sorted(model.stage_of) == [0, 1, 2]
        assert not torch.equal(model.at_validation[2]["body.weight"], model.at_validation[0]["body.weight"])
        for key, value in model.at_validation[0].items():
            assert torch.equal(model.state_dict()[key], value), (limits, key)


def test_best_weights_hold_the_student_only(tmp_path):
    model = Scripted(DOWN_THEN_FLAT)
    callback = StageScheduleCallback(two_stages(patience=3, restore_best=True), verbose=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, max_epochs=7, enable_checkpointing=True, callbacks=[callback, checkpoints]).fit(model)
    assert model.teachers_prepared and model.teachers  # the teacher was there, distilling
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=False)
    stored = ckpt["callbacks"]["StageScheduleCallback"]["adaptive"]["best_weights"]["weights"]
    assert set(stored) == set(model.state_dict())
    teacher = dict(model.teachers)["teacher"]
    assert sum(v.numel() for v in stored.values()) == sum(p.numel() for p in model.parameters())
    assert not any(v.shape == p.shape and torch.equal(v, p.detach()) for v in stored.values()
                   for p in teacher.parameters())


def test_best_weights_in_a_file_under_the_log_dir(tmp_path):
    script = [5.0, 3.0, 4.0, 4.0, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8]
    in_memory, in_file = Scripted(script), Scripted(script)
    stages = two_stages(patience=2, restore_best=True)
    trainer(tmp_path / "m", max_epochs=7, callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(in_memory)
    callback = StageScheduleCallback(stages, verbose=False, best_weights="file")
    trainer(tmp_path / "f", max_epochs=7, callbacks=[callback]).fit(in_file)
    assert (tmp_path / "f" / "best_weights" / "stage_0.pt").is_file()
    for key, value in finish(in_memory).items():
        assert torch.equal(finish(in_file)[key], value), key
    assert callback.adaptive.state_dict()["best_weights"]["weights"] is None


@pytest.mark.parametrize(("resume_after", "restored"), [(2, False), (4, True)])
def test_a_best_weights_file_overwritten_after_the_resumed_checkpoint_is_not_loaded(tmp_path, resume_after, restored):
    """kd's best is epoch 1, then epoch 4, which overwrites the file. A run resumed from epoch 2's checkpoint (best:
    epoch 1) that does not improve again must not restore the original run's epoch 4: it warns and keeps its last
    weights. Resumed from epoch 4's checkpoint, the file is the one it names: restored."""
    script = [5.0, 3.0, 4.0, 4.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    stages = two_stages(patience=5, restore_best=True)
    original = Scripted(script)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, max_epochs=7, enable_checkpointing=True, callbacks=[
        StageScheduleCallback(stages, verbose=False, best_weights="file"), checkpoints]).fit(original)
    resumed = Scripted(script[:resume_after + 1] + [9.0] * (len(script) - resume_after - 1))  # no later improvement
    run = trainer(tmp_path, max_epochs=7, callbacks=[StageScheduleCallback(stages, verbose=False, best_weights="file")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(resumed, ckpt_path=tmp_path / "ckpt" / f"epoch={resume_after}.ckpt")
    stale = [str(w.message) for w in caught if "holds the weights of step" in str(w.message)]
    after_kd = resumed.at_epoch_start[6]
    if restored:
        assert not stale
        for key, value in original.at_validation[4].items():
            assert torch.equal(after_kd[key], value), key
    else:
        assert len(stale) == 1 and "stage_0.pt" in stale[0] and "last weights are kept" in stale[0]
        for key, value in resumed.at_validation[5].items():  # its own last weights
            assert torch.equal(after_kd[key], value), key
        assert not all(torch.equal(after_kd[k], v) for k, v in original.at_validation[4].items())


@pytest.mark.parametrize("damage", ["deleted", "not a torch file", "another model"])
def test_best_weights_that_are_gone_or_do_not_fit_warn_and_keep_the_last_weights(tmp_path, damage):
    """Resumed from epoch 4's checkpoint (kd's best: epoch 4), the best weights restored at kd's end (epoch 5) are gone
    (the run moved, its log dir deleted), damaged, or another model's (a checkpoint written by hand): the run warns
    naming the stage and why, keeps its last weights and trains to its end, instead of a raw error at kd's end."""
    script = [5.0, 3.0, 4.0, 4.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    stages = two_stages(patience=5, restore_best=True)
    where = "memory" if damage == "another model" else "file"
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, max_epochs=7, enable_checkpointing=True, callbacks=[
        StageScheduleCallback(stages, verbose=False, best_weights=where), checkpoints]).fit(Scripted(script))
    ckpt = tmp_path / "ckpt" / "epoch=4.ckpt"
    best_file = tmp_path / "best_weights" / "stage_0.pt"
    if damage == "deleted":
        best_file.unlink()
    elif damage == "not a torch file":
        best_file.write_text("root:x:0:0:root:/root:/bin/bash\n")
    else:
        state = torch.load(ckpt, weights_only=True)
        weights = state["callbacks"]["StageScheduleCallback"]["adaptive"]["best_weights"]["weights"]
        weights["head.weight"] = torch.zeros(5, 8)  # the module's is (3, 8)
        torch.save(state, ckpt)
    resumed = Scripted(script)
    run = trainer(tmp_path / "resumed", max_epochs=7,
                  callbacks=[StageScheduleCallback(stages, verbose=False, best_weights=where)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(resumed, ckpt_path=ckpt)
    assert run.current_epoch == 7
    warned = [str(w.message) for w in caught if "cannot be restored" in str(w.message)]
    assert len(warned) == 1 and warned[0].startswith("StageScheduleCallback: the best weights of stage 0 cannot be "
                                                      "restored: "), warned
    assert warned[0].endswith("The stage's last weights are kept.")
    expected = {"deleted": "FileNotFoundError", "not a torch file": "cannot be read",
                "another model": "`head.weight` has the shape (5, 8), the module (3, 8)"}[damage]
    assert expected in warned[0], warned[0]
    for key, value in resumed.at_validation[5].items():  # its own last weights, going into ft
        assert torch.equal(resumed.at_epoch_start[6][key], value), key


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mode", "mx", r"`mode` = 'mx': must be 'min' or 'max'; did you mean `max`\?"),
    ("patience", 0, r"`patience` = 0: must be an integer >= 1"),
    ("min_delta", -0.1, r"`min_delta` = -0.1: must be >= 0"),
    ("min_epochs", 7, r"`min_epochs` = 7: is longer than the stage, which has 6 epochs \(\[0, 6\)\)"),
    ("restore_best", "yes", r"`restore_best` = 'yes': must be true or false"),
    ("data", 1, r"`data` = 1: must be a string"),
])
def test_bad_input_names_stage_field_and_value(field, value, message):
    stage = {"name": "kd", "start_epoch": 0, "end_epoch": 6, "monitor": "val/score", "patience": 1, field: value}
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\): " + message):
        StageScheduleCallback([stage])


@pytest.mark.parametrize("field", ["patience", "restore_best", "mode", "min_delta"])
def test_fields_that_need_monitor(tmp_path, field):
    stage = {"name": "kd", "start_epoch": 0, field: {"patience": 2, "restore_best": True, "mode": "max",
                                                     "min_delta": 0.1}[field]}
    path = tmp_path / "seed.json"
    path.write_text(json.dumps({"stage_schedule": [stage]}))
    with pytest.raises(StageConfigError, match=rf"stage 0 \('kd'\): `{field}` = .*: needs `monitor`"):
        StageSchedule.from_config(path)


def test_min_epochs_of_a_stage_that_runs_to_the_end_is_checked_against_the_run(tmp_path):
    stage = {"name": "ft", "start_epoch": 2, "monitor": "val/score", "patience": 1, "min_epochs": 4}
    with pytest.raises(StageConfigError, match=r"`min_epochs` = 4: is longer than the stage, which has 3 epochs"):
        trainer(tmp_path, max_epochs=5, callbacks=[StageScheduleCallback([stage])]).fit(Scripted(ALWAYS_BETTER))


def test_restore_best_without_a_validation_in_the_stage_keeps_the_last_weights(tmp_path):
    model = Scripted(DOWN_THEN_FLAT, momentum=0.9)
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "monitor": "val/score", "restore_best": True},
              {"name": "ft", "start_epoch": 2}]
    with pytest.warns(UserWarning, match=r"stage 0 has `restore_best` but no validation ran in it"):
        trainer(tmp_path, max_epochs=3, limit_val_batches=0,
                callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(model)
    assert model.stage_of == {0: "kd", 1: "kd", 2: "ft"}
    assert model.optimizer_state[2] == len(list(model.parameters()))  # the momentum was not reset


def test_restore_best_when_no_validation_gave_a_finite_value_says_so(tmp_path):
    model = Scripted([math.nan, math.nan, 1.0], momentum=0.9)
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "monitor": "val/score", "restore_best": True},
              {"name": "ft", "start_epoch": 2}]
    with pytest.warns(UserWarning, match=r"stage 0 has `restore_best` but none of its validations gave a finite "
                                         r"value; its last weights are kept"):
        trainer(tmp_path, max_epochs=3, callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(model)
    assert set(model.at_validation) == {0, 1, 2}  # the stage's validations ran, with NaN
    assert model.optimizer_state[2] == len(list(model.parameters()))  # nothing restored: the momentum was kept


def test_resume_from_a_checkpoint_taken_at_validation_end_restores_and_switches_data(tmp_path):
    """A checkpoint written at the last validation of the stage, before its epoch end (Lightning runs that epoch's
    end again on resume): the resumed run restores the stage's best weights and builds the next stage's data before
    its first batch, as the run that never stopped."""
    stages = [dict(RESUMED_STAGES[0], data="all"), dict(RESUMED_STAGES[1], data="labelled")]
    whole = ScriptedData(DOWN_THEN_FLAT)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}",
                                  save_on_train_epoch_end=False)
    trainer(tmp_path, max_epochs=9, enable_checkpointing=True,
            callbacks=[StageScheduleCallback(stages, verbose=False), checkpoints]).fit(whole)
    resumed = ScriptedData(DOWN_THEN_FLAT)
    trainer(tmp_path / "resumed", max_epochs=9, callbacks=[StageScheduleCallback(stages, verbose=False)]).fit(
        resumed, ckpt_path=tmp_path / "ckpt" / "epoch=3.ckpt")  # kd's last epoch
    assert resumed.stage_of == dict.fromkeys(range(4, 9), "ft")
    assert resumed.batches == dict.fromkeys(range(4, 9), 1)  # "labelled" from the first resumed batch
    assert resumed.losses == whole.losses[-len(resumed.losses):]
    for key, value in finish(whole).items():
        assert torch.equal(finish(resumed)[key], value), key


@pytest.mark.parametrize("restore_best", [True, False])
def test_restore_best_beside_weight_averaging_is_refused_before_the_first_batch(tmp_path, restore_best):
    averaging = pytest.importorskip("lightning.pytorch.callbacks").EMAWeightAveraging  # Lightning >= 2.6
    model = Scripted(DOWN_THEN_FLAT)
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "monitor": "val/score", "restore_best": restore_best},
              {"name": "ft", "start_epoch": 2}]
    fit = trainer(tmp_path, max_epochs=3, callbacks=[StageScheduleCallback(stages, verbose=False), averaging()]).fit
    if not restore_best:  # a plateau stage alone is fine beside it
        fit(model)
        assert model.stage_of == {0: "kd", 1: "kd", 2: "ft"}
        return
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\).*`restore_best` = True: cannot be used beside "
                                               r"EMAWeightAveraging: validation scores the averaged weights"):
        fit(model)
    assert model.losses == []  # not one batch trained


def test_restore_best_beside_stochastic_weight_averaging_is_refused_before_the_first_batch(tmp_path):
    # SWA puts its averaged weights in the module at the end of the fit, over the restored best
    model = Scripted(DOWN_THEN_FLAT)
    stages = [{"name": "kd", "start_epoch": 0, "end_epoch": 2, "monitor": "val/score", "restore_best": True},
              {"name": "ft", "start_epoch": 2}]
    swa = StochasticWeightAveraging(swa_lrs=0.01)
    fit = trainer(tmp_path, max_epochs=3, callbacks=[StageScheduleCallback(stages, verbose=False), swa]).fit
    with pytest.raises(StageConfigError, match=r"stage 0 \('kd'\).*`restore_best` = True: cannot be used beside "
                                               r"StochasticWeightAveraging: it puts its averaged weights in place"):
        fit(model)
    assert model.losses == []  # not one batch trained


class StepCounter(torch.nn.Module):
    """A submodule whose state is not a tensor (``get_extra_state``): the number of training steps it has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def get_extra_state(self):
        return {"steps": self.steps}

    def set_extra_state(self, state):
        self.steps = state["steps"]


class WithExtraState(Scripted):
    def __init__(self, script) -> None:
        super().__init__(script)
        self.counter = StepCounter()
        self.steps_at_validation: dict[int, int] = {}

    def record(self, batch, batch_idx, loss):
        super().record(batch, batch_idx, loss)
        self.counter.steps += 1

    def on_train_epoch_start(self):
        self.at_epoch_start[self.current_epoch] = {k: v.clone() for k, v in self.state_dict().items()
                                                   if isinstance(v, torch.Tensor)}
        self.steps_at_epoch_start = getattr(self, "steps_at_epoch_start", {})
        self.steps_at_epoch_start[self.current_epoch] = self.counter.steps

    def validation_step(self, batch, batch_idx):
        self.at_validation[self.current_epoch] = {k: v.clone() for k, v in self.state_dict().items()
                                                  if isinstance(v, torch.Tensor)}
        self.steps_at_validation[self.current_epoch] = self.counter.steps
        self.log("val/score", float(self.script[self.current_epoch]))


@pytest.mark.parametrize("where", ["memory", "file"])
def test_restore_best_of_a_module_with_extra_state_restores_it_too(tmp_path, where):
    """A submodule's extra state (not a tensor) is kept with the best weights and restored with them; it raised
    AttributeError ('dict' object has no attribute 'detach') at the stage's first validation."""
    model = WithExtraState(DOWN_THEN_FLAT)
    callback = StageScheduleCallback(two_stages(patience=1, restore_best=True), verbose=False, best_weights=where)
    trainer(tmp_path, max_epochs=7, callbacks=[callback]).fit(model)
    assert model.stage_of[3] == "kd" and model.stage_of[4] == "ft"  # kd ends on its plateau after epoch 3
    best = min(range(4), key=lambda e: DOWN_THEN_FLAT[e])  # epoch 2 (3.0; epoch 3 does not improve on it)
    for key, value in model.at_validation[best].items():
        assert torch.equal(model.at_epoch_start[4][key], value), key
    assert model.steps_at_epoch_start[4] == model.steps_at_validation[best] == 2 * (best + 1)  # 2 batches an epoch
