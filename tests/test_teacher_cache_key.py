"""The teacher cache's key: what the teachers' outputs depend on beyond their ``state_dict`` keeps apart the rows of
runs that differ in it (the autocast the teachers run under, their non-persistent buffers), and two identical runs
still share them."""

import contextlib

import _cache_ddp_worker as worker
import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import IndexedDataset, StageScheduleCallback, TeacherCache
from lightning_stages.distillation.teacher_fingerprint import teacher_fingerprint
from lightning_stages.losses import logit_kd

STEPS = worker.N_SAMPLES // worker.BATCH_SIZE
#: the fingerprint of the plain ``nn.Linear`` below, as 0.2 computed it
PLAIN_KEY = "24f3ed5cf4d42a14a0fd6b00b0bfd98f"


class Shifted(nn.Module):
    """The worker's teacher reading its input minus a non-persistent buffer (as a normalisation constant is kept)."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.net = worker.make_teacher()
        self.register_buffer("shift", torch.full((5,), shift), persistent=False)

    def forward(self, x):
        return self.net(x - self.shift)


class KeyStudent(worker.Student):
    """The worker's student with a teacher of our own, no feature hooks; keeps each step's teacher outputs."""

    def __init__(self, directory, teacher: nn.Module, teacher_precision=None) -> None:
        super().__init__(str(directory))
        self.teacher_precision = teacher_precision
        self.__dict__["teacher"] = teacher  # not a submodule: a teacher

    def configure_teachers(self):
        self.teacher.register_forward_pre_hook(lambda *_: setattr(self, "teacher_calls", self.teacher_calls + 1))
        return {"teacher": self.teacher}

    def configure_feature_hooks(self):
        return {}

    def training_step(self, batch, batch_idx):
        x, _, index = batch
        out = self.run_teachers(x, sample_index=index)["teacher"]
        self.seen.append((x.clone(), out.detach().clone()))
        return logit_kd(self.net(x).float(), out.float())


def _fit_once(directory, teacher, precision="32-true", teacher_precision=None) -> KeyStudent:
    """One epoch of a distilling fit on the worker's inputs, in order; the module, with what each step saw."""
    model = KeyStudent(directory, teacher, teacher_precision)
    data = IndexedDataset(TensorDataset(worker.inputs(), torch.zeros(worker.N_SAMPLES, dtype=torch.long)))
    pl.Trainer(max_epochs=1, precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
               callbacks=[StageScheduleCallback(stage_schedule=[{"name": "kd", "start_epoch": 0, "distillation": True}],
                                                verbose=False)],
               ).fit(model, DataLoader(data, batch_size=worker.BATCH_SIZE))
    return model


def _assert_live(model: KeyStudent, teacher: nn.Module, autocast) -> None:
    """Every step got what ``teacher`` (another instance than the fit's, whose calls are counted) gives on its batch
    under ``autocast`` (a dtype, or None), dtype included."""
    assert len(model.seen) == STEPS
    for x, served in model.seen:
        with torch.no_grad(), (torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()):
            live = teacher(x)
        assert live.dtype == (autocast or torch.float32)
        torch.testing.assert_close(served, live)


@pytest.mark.parametrize("teacher_precision", [None, "32-true"])  # neither sets an autocast: the Trainer's stays
@pytest.mark.parametrize(("first", "then"), [("32-true", "bf16-mixed"), ("bf16-mixed", "32-true")])
def test_a_fit_under_another_trainer_precision_recomputes_and_a_same_one_hits(tmp_path, first, then,
                                                                               teacher_precision):
    dtype = {"32-true": None, "bf16-mixed": torch.bfloat16}
    reference = worker.make_teacher()
    filled = _fit_once(tmp_path, worker.make_teacher(), first, teacher_precision)
    assert filled.teacher_calls == STEPS
    _assert_live(filled, reference, dtype[first])
    other = _fit_once(tmp_path, worker.make_teacher(), then, teacher_precision)
    assert other.teacher_calls == STEPS  # the rows of the first fit are of another precision
    _assert_live(other, reference, dtype[then])
    again = _fit_once(tmp_path, worker.make_teacher(), then, teacher_precision)
    assert again.teacher_calls == 0  # the same settings: one key, all read from the directory
    _assert_live(again, reference, dtype[then])


def test_an_explicit_teacher_precision_is_its_own_autocast_whatever_the_trainer_and_the_callers(tmp_path):
    reference = worker.make_teacher()
    filled = _fit_once(tmp_path, worker.make_teacher(), "32-true", teacher_precision="16-mixed")
    assert filled.teacher_calls == STEPS
    _assert_live(filled, reference, torch.float16)
    again = _fit_once(tmp_path, worker.make_teacher(), "bf16-mixed", teacher_precision="16-mixed")
    assert again.teacher_calls == 0  # the teachers' autocast is teacher_precision's, not the Trainer's
    _assert_live(again, reference, torch.float16)
    # outside a fit: the caller's own autocast around run_teachers is in the key too, and changes of it are followed
    model = KeyStudent(tmp_path, worker.make_teacher())
    model.prepare_teachers()
    model.use_distillation = True
    x, index = worker.inputs()[:4], torch.arange(4)
    for autocast, calls in [(None, 1), (torch.bfloat16, 2), (torch.bfloat16, 2), (None, 3)]:
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            model.seen.append((x, model.run_teachers(x, sample_index=index)["teacher"]))
        assert model.teacher_calls == calls
        model.seen, [(_, served)] = [], model.seen
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            torch.testing.assert_close(served, reference(x))


def test_a_teacher_with_another_non_persistent_buffer_is_not_served_the_old_rows(tmp_path):
    assert _fit_once(tmp_path, Shifted(0.0)).teacher_calls == STEPS
    shifted = Shifted(0.5)
    assert "shift" not in shifted.state_dict()
    other = _fit_once(tmp_path, shifted)
    assert other.teacher_calls == STEPS
    _assert_live(other, Shifted(0.5), None)
    again = _fit_once(tmp_path, Shifted(0.5))
    assert again.teacher_calls == 0
    _assert_live(again, Shifted(0.5), None)


def test_the_fingerprint_reads_non_persistent_buffers_and_keeps_the_other_teachers_keys():
    a, b = Shifted(0.0), Shifted(0.0)
    assert teacher_fingerprint({"t": a}) == teacher_fingerprint({"t": b})
    b.shift[0] = 1.0
    assert teacher_fingerprint({"t": a}) != teacher_fingerprint({"t": b})
    b.shift = torch.zeros(5, dtype=torch.float64)  # the same values in another dtype
    assert teacher_fingerprint({"t": a}) != teacher_fingerprint({"t": b})
    # a teacher without non-persistent buffers keeps the key it had (one of 0.2's, computed then)
    plain = nn.Linear(2, 1)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([[1.0, -2.0]]))
        plain.bias.fill_(0.5)
    assert teacher_fingerprint({"t": plain}, {"t": [""]}, {"precision": None}) == PLAIN_KEY


class NewTeacherWeights(pl.Callback):
    """Loads other weights into the fit's teacher at the end of epoch 0 (``load_state_dict``: in place)."""

    def __init__(self, weights: dict) -> None:
        self.weights = weights

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            pl_module.teachers["teacher"].load_state_dict(self.weights)


@pytest.mark.parametrize("directory", [False, True])
def test_teacher_weights_changed_in_place_during_a_fit_are_not_served_the_old_rows(tmp_path, directory):
    other = worker.make_teacher(seed=99)  # the worker's teacher, other weights
    reference = {0: worker.make_teacher(), 1: other}
    model = KeyStudent(tmp_path, worker.make_teacher())
    if not directory:
        model.teacher_cache = TeacherCache()
    data = IndexedDataset(TensorDataset(worker.inputs(), torch.zeros(worker.N_SAMPLES, dtype=torch.long)))
    epochs = []
    model.on_train_epoch_start = lambda: epochs.append(len(model.seen))  # the first step of each epoch
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
               callbacks=[StageScheduleCallback(stage_schedule=[{"name": "kd", "start_epoch": 0, "distillation": True}],
                                                verbose=False), NewTeacherWeights(other.state_dict())],
               ).fit(model, DataLoader(data, batch_size=worker.BATCH_SIZE))
    assert epochs == [0, STEPS] and len(model.seen) == 2 * STEPS
    assert model.teacher_calls == 2 * STEPS  # the new weights: a new key, every batch computed again
    for step, (x, served) in enumerate(model.seen):
        with torch.no_grad():
            torch.testing.assert_close(served, reference[step // STEPS](x))
