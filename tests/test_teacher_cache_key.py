"""The teacher cache's key: what the teachers' outputs depend on beyond their ``state_dict`` keeps apart the rows of
runs that differ in it (the autocast the teachers run under, their non-persistent buffers), and two identical runs
still share them."""

import contextlib
import enum
import importlib.util
import sys
from pathlib import Path

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
#: the fingerprint of the plain ``nn.Linear`` below (since the tenth session, when the modules' settings began to
#: count: 0.2 computed "24f3ed5cf4d42a14a0fd6b00b0bfd98f"); it must not change by accident
PLAIN_KEY = "894007117193b933e9f1bf8f5ca1a695"


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
    # a teacher without non-persistent buffers keeps its key (in eval mode, as every teacher is prepared: one left in
    # training mode has another key since the eleventh session)
    plain = nn.Linear(2, 1).eval()
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([[1.0, -2.0]]))
        plain.bias.fill_(0.5)
    assert teacher_fingerprint({"t": plain}, {"t": [""]}, {"precision": None}) == PLAIN_KEY


def _teacher_key(folder: Path, forward: str) -> str:
    """The key of ``Teacher`` (fixed weights) from a module ``teacher_code`` written in ``folder``: a base class whose
    ``forward`` is ``forward``, and a subclass (the teacher) whose own source is the same in every folder."""
    folder.mkdir()
    (folder / "teacher_code.py").write_text(
        "from torch import nn\n\n\nclass Base(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        f"        self.layer = nn.Linear(2, 2)\n\n    def forward(self, x):\n        return {forward}\n\n\n"
        "class Teacher(Base):\n    pass\n")
    spec = importlib.util.spec_from_file_location("teacher_code", folder / "teacher_code.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["teacher_code"] = module  # where inspect finds a class's file, as for an imported module
    try:
        spec.loader.exec_module(module)
        teacher = module.Teacher().eval()
        with torch.no_grad():
            teacher.layer.weight.fill_(0.5)
            teacher.layer.bias.fill_(0.25)
        return teacher_fingerprint({"t": teacher})
    finally:
        del sys.modules["teacher_code"]


def test_an_edited_inherited_forward_changes_the_key(tmp_path):
    # the teacher's class only inherits forward: editing the base class kept the key, and a cache in a directory
    # served the rows of the old forward
    first = _teacher_key(tmp_path / "a", "self.layer(x)")
    assert _teacher_key(tmp_path / "b", "2 * self.layer(x)") != first
    assert _teacher_key(tmp_path / "c", "self.layer(x)") == first  # the same code again: the same key


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


class Scaled(nn.Module):
    """A linear layer, a LayerNorm and plain settings that change the outputs without changing a weight."""

    def __init__(self, temperature: float = 1.0, eps: float = 1e-5, act=torch.tanh, helper=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.norm = nn.Linear(5, 3), nn.LayerNorm(3, eps=eps)
        self.temperature, self.act, self.helper = temperature, act, helper

    def forward(self, x):
        return self.act(self.norm(self.lin(x))) / self.temperature


def test_teachers_that_differ_only_in_a_plain_setting_have_other_keys():
    key = teacher_fingerprint({"t": Scaled()})
    assert teacher_fingerprint({"t": Scaled()}) == key
    for other in (Scaled(temperature=4.0), Scaled(eps=10.0), Scaled(act=torch.sigmoid), Scaled(temperature=float("nan"))):
        assert teacher_fingerprint({"t": other}) != key
    assert teacher_fingerprint({"t": Scaled()}, version="v1") != teacher_fingerprint({"t": Scaled(eps=10.0)},
                                                                                     version="v1")
    # where a teacher says it runs does not change its outputs: two DDP ranks on two devices share one key
    assert teacher_fingerprint({"t": Scaled(helper=torch.device("cuda", 0))}) == teacher_fingerprint(
        {"t": Scaled(helper=torch.device("cuda", 1))})


def test_a_huggingface_teacher_with_other_attention_heads_and_the_same_weights_has_another_key():
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    def bert(heads: int) -> nn.Module:
        torch.manual_seed(1)
        return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=heads,
                                    intermediate_size=32, max_position_embeddings=16))

    one, four = bert(1), bert(4)
    four.load_state_dict(one.state_dict())  # the same weights: only the config differs, and the outputs
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(one(ids).last_hidden_state, four(ids).last_hidden_state)
    assert teacher_fingerprint({"t": one}) != teacher_fingerprint({"t": four})
    assert teacher_fingerprint({"t": one}) == teacher_fingerprint({"t": bert(1)})


class _Opaque:
    """An object whose repr holds its address."""


class _Kind(enum.Enum):
    OPAQUE = _Opaque()


def test_the_key_of_a_teacher_with_functions_objects_and_tensors_as_settings_is_the_same_in_another_process():
    import functools
    import subprocess
    import sys

    code = ("import functools, torch, sys; sys.path.insert(0, {tests!r}); import test_teacher_cache_key as t; "
            "from lightning_stages.distillation.teacher_fingerprint import teacher_fingerprint; "
            "m = t.Scaled(act=functools.partial(torch.clamp, min=0.0), helper=[t._Opaque(), torch.arange(3.0)]); "
            "print(teacher_fingerprint({{'t': m}}))")
    here = Scaled(act=functools.partial(torch.clamp, min=0.0), helper=[_Opaque(), torch.arange(3.0)])
    # dict keys and enum values whose repr holds an address: the key was another in every process
    here.names, here.kind = {torch.tanh: "act", _Opaque: 1, torch.device("cpu"): 2}, _Kind.OPAQUE
    code = code.replace("; print(", "; m.names, m.kind = {{torch.tanh: 'act', t._Opaque: 1, torch.device('cpu'): 2}}, "
                                    "t._Kind.OPAQUE; print(")
    there = subprocess.run([sys.executable, "-c", code.format(tests=str(Path(__file__).parent))], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert there == teacher_fingerprint({"t": here})
    other = Scaled(act=functools.partial(torch.clamp, min=1.0), helper=[_Opaque(), torch.arange(3.0)])
    assert teacher_fingerprint({"t": other}) != there
    other = Scaled(act=functools.partial(torch.clamp, min=0.0), helper=[_Opaque(), torch.arange(4.0)])
    assert teacher_fingerprint({"t": other}) != there


def test_a_teacher_with_another_plain_setting_is_not_served_the_old_rows(tmp_path):
    """End to end: a directory filled by one teacher, read by a fit whose teacher divides by another temperature."""
    _fit_once(tmp_path, TemperatureTeacher(1.0))
    other = _fit_once(tmp_path, TemperatureTeacher(4.0))
    assert other.teacher_calls > 0
    _assert_live(other, TemperatureTeacher(4.0), None)


class TemperatureTeacher(nn.Module):
    """The worker's teacher, its outputs divided by a plain ``temperature`` attribute."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.net, self.temperature = worker.make_teacher(), temperature

    def forward(self, x):
        return self.net(x) / self.temperature


def test_numpy_settings_count_by_their_values():
    import numpy as np

    def key(helper) -> str:
        return teacher_fingerprint({"t": Scaled(helper=helper)})

    assert key(np.arange(3.0)) == key(np.arange(3.0)) != key(np.arange(3.0) + 1)
    assert key(np.arange(3.0)) != key(np.arange(3.0).astype(np.float32))  # the same values in another dtype
    assert key(np.float32(0.5)) == key(np.float32(0.5)) != key(np.float32(0.25))
    assert key(np.array(2.0)) != key(np.array(3.0))  # 0-d


def test_a_sparse_tensor_among_the_settings_counts_by_its_indices_and_values():
    """A graph teacher keeping its adjacency as a plain sparse attribute: the key raised a raw ``RuntimeError``."""
    indices = torch.tensor([[0, 1, 2], [1, 2, 0]])

    def key(values, layout=torch.sparse_coo) -> str:
        adjacency = torch.sparse_coo_tensor(indices, torch.tensor(values), (3, 3))
        return teacher_fingerprint({"t": Scaled(helper=adjacency if layout == torch.sparse_coo
                                                else adjacency.to_sparse_csr())})

    assert key([1.0, 2.0, 3.0]) == key([1.0, 2.0, 3.0]) != key([1.0, 2.0, 4.0])
    assert key([1.0, 2.0, 3.0], torch.sparse_csr) != key([1.0, 2.0, 4.0], torch.sparse_csr)
