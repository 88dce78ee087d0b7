"""The teacher cache at its edges: argument positions, unreadable inputs, bad or full files, limits, lazy features."""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import resource
import signal
import warnings
from pathlib import Path

import _cache_ddp_worker as worker
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import IndexedDataset, StageConfigError, StageScheduleCallback, TeacherCache
from lightning_stages.distillation.teacher_cache_inputs import input_fingerprints
from lightning_stages.errors import DistillationStepError

FORK = multiprocessing.get_context("fork")  # children start at once, without importing torch again
STEPS = worker.N_SAMPLES // worker.BATCH_SIZE  # per epoch


def bound(directory=None, **kwargs) -> TeacherCache:
    cache = TeacherCache(directory, **kwargs)
    cache.bind("k")
    return cache


# ------------------------------------------------------------------------------------------------ where inputs stand


class MaskTeacher(nn.Module):
    """A BERT-like signature: which of the two optional tensors is given changes the output."""

    def forward(self, x, attention_mask=None, token_type_ids=None):
        out = x
        if attention_mask is not None:
            out = out * attention_mask
        if token_type_ids is not None:
            out = out + 100 * token_type_ids
        return out


class ScaleTeacher(nn.Module):
    """Images times a scale that broadcasts along the axis its shape says."""

    def forward(self, images, scale):
        return (images * scale).flatten(1)


def rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


X = rand(4, 6, seed=0)
M = (rand(4, 6, seed=1) > 0).float()  # one row per sample
Y = rand(4, 3, seed=2)
SHARED = rand(7, seed=3)  # not one row per sample


def clones(inputs):
    """``inputs`` with every tensor replaced by a copy (the same values, another object)."""
    def copy(value):
        return value.clone() if isinstance(value, torch.Tensor) else value

    args, kwargs = inputs
    return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}


@pytest.mark.parametrize(("first", "second"), [
    (((X, M, None), {}), ((X, None, M), {})),
    (((X, Y, SHARED), {}), ((X, SHARED, Y), {})),
    (((X, 2.0), {}), ((2.0, X), {})),
    (((X,), {"a": {}, "b": 1}), ((X,), {"a": {"b": 1}})),
    (((X, torch.arange(1.0, 9.0).reshape(1, 8)), {}), ((X, torch.arange(1.0, 9.0).reshape(8, 1)), {})),
], ids=["(x, m, None) vs (x, None, m)", "(x, y, s) vs (x, s, y)", "(x, 2.0) vs (2.0, x)",
        "a={}, b=1 vs a={'b': 1}", "shared (1, 8) vs (8, 1)"])
def test_inputs_of_another_structure_or_shared_shape_have_other_checksums(first, second):
    expected = input_fingerprints(first, 4)
    assert torch.equal(input_fingerprints(clones(first), 4), expected)  # the same values: the same checksums
    assert (input_fingerprints(second, 4) != expected).all()


IMAGES = rand(4, 8, 8, seed=4)


@pytest.mark.parametrize(("teacher", "first", "second"), [
    (MaskTeacher(), ((X, M, None), {}), ((X, None, M), {})),
    (ScaleTeacher(), ((IMAGES, torch.arange(1.0, 9.0).reshape(1, 8)), {}),
     ((IMAGES, torch.arange(1.0, 9.0).reshape(8, 1)), {})),
], ids=["mask moved", "shared shape"])
def test_rows_stored_for_one_call_are_not_served_for_another(teacher, first, second):
    with torch.no_grad():
        outputs = teacher(*first[0])
    assert not torch.equal(outputs, teacher(*second[0]))  # the teacher tells the two calls apart
    cache = bound()
    cache.store(torch.arange(4), {"t": outputs}, {}, inputs=first)
    hit = cache.lookup(torch.arange(4), inputs=clones(first))
    assert hit is not None and torch.equal(hit[0]["t"], outputs)
    assert cache.lookup(torch.arange(4), inputs=second) is None


# ------------------------------------------------------------------------------------------------ unreadable inputs


def _quantized_lookup(send) -> None:
    """A forked child's lookup of a quantized tensor: sends what it raised (a crash sends nothing)."""
    faulthandler.disable()  # a crash is the parent's failure to report, not a traceback dump
    torch.set_num_threads(1)  # a forked child: OpenMP's threads did not survive the fork
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        q = torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8)
    try:
        bound().lookup(list(range(4)), inputs=((q,), {}))
        send.send("no error")
    except DistillationStepError as err:
        send.send(f"DistillationStepError naming {err.problems[0].field}")
    except Exception as err:
        send.send(f"raw {type(err).__name__}")


UNREADABLE = {
    "jagged nested tensor": lambda: torch.nested.nested_tensor([torch.ones(n) for n in (2, 3, 1, 2)],
                                                                layout=torch.jagged),
    "strided nested tensor": lambda: torch.nested.nested_tensor([torch.ones(n) for n in (2, 3, 1, 2)]),
    "numpy strings": lambda: np.array(["a", "b", "c", "d"]),
    "numpy datetime64": lambda: np.array(["2020-01-01"] * 4, dtype="datetime64[D]"),
    "structured numpy": lambda: np.zeros(4, dtype=[("a", "f4"), ("b", "i4")]),
}
MKLDNN = pytest.param(lambda: torch.randn(4, 3).to_mkldnn(), id="MKL-DNN tensor",
                      marks=pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no MKL-DNN"))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("make", [*(pytest.param(make, id=name) for name, make in UNREADABLE.items()), MKLDNN])
@pytest.mark.parametrize("form", ["alone", "beside a batch"])
def test_an_input_whose_bytes_cannot_be_read_is_refused_naming_inputs(make, form):
    value = make()
    inputs = ((value,), {}) if form == "alone" else ((X,), {"extra": value})
    with pytest.raises(DistillationStepError) as info:
        bound().lookup(list(range(4)), inputs=inputs)
    assert info.value.problems[0].field == "inputs"
    assert "cannot be checked" in str(info.value)


def test_a_quantized_input_is_refused_naming_inputs():
    """In a forked child: reading a quantized tensor's bytes can crash the process."""
    receive, send = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_quantized_lookup, args=(send,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    result = receive.recv() if receive.poll() else None
    assert (child.exitcode, result) == (0, "DistillationStepError naming inputs")


@pytest.mark.parametrize("storage", ["memory", "directory"])
def test_a_big_endian_array_is_read_as_its_values(tmp_path, storage):
    big = np.arange(8, dtype=">f4").reshape(4, 2)
    native = np.arange(8, dtype="<f4").reshape(4, 2)  # the same values in this machine's byte order
    assert big.tobytes() != native.tobytes()
    assert torch.equal(input_fingerprints(((big,), {}), 4), input_fingerprints(((native,), {}), 4))
    cache = bound(tmp_path if storage == "directory" else None)
    outputs = torch.arange(8.0).reshape(4, 2) * 3
    assert cache.lookup(list(range(4)), inputs=((big,), {})) is None
    cache.store(list(range(4)), {"t": outputs}, {}, inputs=((big,), {}))
    hit = cache.lookup(list(range(4)), inputs=((big,), {}))
    assert hit is not None and torch.equal(hit[0]["t"], outputs)
    changed = big.copy()
    changed[2, 1] += 1
    assert cache.lookup(list(range(4)), inputs=((changed,), {})) is None


# ------------------------------------------------------------------------------------------------ the files


def records(directory: Path) -> tuple[Path, int, int]:
    """The one shard under ``directory``: ``(path, offset of the first record, bytes per record)``."""
    (path,) = sorted(directory.glob("tc2-*/*.rows"))
    data = path.read_bytes()
    length = int.from_bytes(data[8:12], "little")
    return path, -(-(16 + length) // 8) * 8, json.loads(data[16:16 + length])["record_bytes"]


def test_an_intact_record_of_the_sample_stored_for_another_input_is_not_served(tmp_path):
    a, b = rand(1, 3, seed=5), rand(1, 3, seed=6)  # two inputs of sample 5
    cache = bound(tmp_path)
    cache.store([5], {"t": a * 2 + 1}, {}, inputs=a)  # record 0
    assert cache.lookup([5], inputs=b) is None
    cache.store([5], {"t": b * 2 + 1}, {}, inputs=b)  # record 1
    assert torch.equal(cache.lookup([5], inputs=b)[0]["t"], b * 2 + 1)
    path, offset, size = records(tmp_path)
    data = bytearray(path.read_bytes())
    data[offset + size:offset + 2 * size] = data[offset:offset + size]  # record 1 now holds record 0: intact, for a
    path.write_bytes(bytes(data))
    assert cache.lookup([5], inputs=b) is None


def test_complex128_rows_of_a_batch_of_one_are_read_from_the_directory(tmp_path):
    x = rand(4, 3, seed=7)
    outputs = rand(4, 2, seed=8, dtype=torch.complex128)
    cache = bound(tmp_path)
    cache.store([0, 1, 2, 3], {"t": outputs}, {}, inputs=x)
    for sample in range(4):
        hit = cache.lookup([sample], inputs=x[sample:sample + 1])
        assert hit is not None and torch.equal(hit[0]["t"], outputs[sample:sample + 1])
    hit = cache.lookup([3, 1], inputs=x[[3, 1]])
    assert hit is not None and torch.equal(hit[0]["t"], outputs[[3, 1]])


def test_a_write_that_fails_warns_once_and_its_rows_are_not_served(tmp_path):
    x, outputs = rand(12, 3, seed=9), rand(12, 2, seed=10)
    cache = bound(tmp_path)
    cache.store([0, 1, 2, 3], {"t": outputs[:4]}, {}, inputs=x[:4])
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, old_limit[1]))  # no file may grow: a full disk
            try:
                cache.store([4, 5, 6, 7], {"t": outputs[4:8]}, {}, inputs=x[4:8])  # to the open shard
                cache.store([8, 9, 10, 11], {"t": outputs[8:]}, {}, inputs=x[8:])  # to a new one
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    finally:
        signal.signal(signal.SIGXFSZ, old_handler)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    assert "cannot write to" in messages[0] and str(tmp_path) in messages[0]
    assert cache.lookup([4, 5, 6, 7], inputs=x[4:8]) is None
    assert cache.lookup([8, 9, 10, 11], inputs=x[8:]) is None
    hit = cache.lookup([0, 1, 2, 3], inputs=x[:4])  # the rows written before are still served
    assert hit is not None and torch.equal(hit[0]["t"], outputs[:4])
    cache.store([4, 5, 6, 7], {"t": outputs[4:8]}, {}, inputs=x[4:8])  # the disk has room again
    hit = cache.lookup([4, 5, 6, 7], inputs=x[4:8])
    assert hit is not None and torch.equal(hit[0]["t"], outputs[4:8])


def test_a_directory_that_keeps_growing_because_inputs_change_warns_once(tmp_path):
    cache, index = bound(tmp_path), list(range(16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(20):  # a random augmentation: another input every epoch, so every row is stored again
            x = rand(16, 3, seed=100 + epoch)
            assert cache.lookup(index, inputs=x) is None
            cache.store(index, {"t": 2 * x}, {}, inputs=x)
    grows = [str(w.message) for w in caught if "only grows" in str(w.message)]
    assert len(grows) == 1 and "for 16 samples" in grows[0], grows  # 320 rows on disk for 16 samples
    assert sum(path.stat().st_size for path in tmp_path.glob("tc2-*/*.rows")) > 320 * 24  # 24 bytes of row head each


# ------------------------------------------------------------------------------------------------ limits


FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
          if hasattr(torch, name)]


@pytest.mark.parametrize("dtype", [*FLOAT8, torch.int32, torch.bool, torch.complex64], ids=str)
def test_a_stored_dtype_other_than_the_four_float_types_is_refused_naming_dtype(dtype):
    with pytest.raises(StageConfigError) as info:
        TeacherCache(dtype=dtype)
    assert info.value.problems[0].field == "dtype"


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_the_four_float_types_and_none_are_accepted_and_round_trip(dtype):
    outputs = torch.tensor([[1.5, -2.0], [0.25, 3.0]])
    cache = bound(dtype=dtype)
    cache.store([0, 1], {"t": outputs}, {})
    assert torch.equal(cache.lookup([0, 1])[0]["t"], outputs)  # each value fits every one of them exactly


@pytest.mark.parametrize("storage", ["memory", "directory"])
def test_a_sample_index_from_two_to_the_63_is_refused_naming_it(tmp_path, storage):
    cache = bound(tmp_path if storage == "directory" else None)
    index = torch.tensor([2**63 + 5], dtype=torch.uint64)
    x = rand(1, 3, seed=11)
    for call in (lambda: cache.lookup(index, inputs=x), lambda: cache.store(index, {"t": x * 2}, {}, inputs=x)):
        with pytest.raises(DistillationStepError, match=r"2\*\*63") as info:
            call()
        assert info.value.problems[0].field == "sample_index"
    assert len(cache) == 0


@pytest.mark.parametrize("storage", ["memory", "directory"])
def test_an_empty_list_of_indices_with_an_empty_batch_is_a_miss(tmp_path, storage):
    cache = bound(tmp_path if storage == "directory" else None)
    empty = ((torch.zeros(0, 3),), {})
    assert cache.lookup([], inputs=empty) is None
    cache.store([], {"t": torch.zeros(0, 2)}, {}, inputs=empty)
    assert cache.lookup([], inputs=empty) is None
    assert len(cache) == 0


# ------------------------------------------------------------------------------------------------ deferred features


class DeferredStudent(worker.Student):
    """The worker's student (teacher feature hook on its Tanh, ``"1"``) with an in-memory cache that stores outputs
    only; ``call`` runs the teachers and reads the feature, and each step keeps ``(epoch, input, feature)``."""

    def __init__(self, call) -> None:
        super().__init__("unused")
        self.teacher_cache = TeacherCache(store_features=False)
        self.call = call

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        clean = x.clone()
        outputs, feature = self.call(self, x, index)
        self.seen.append({"epoch": self.current_epoch, "x": clean, "feature": feature.detach().clone()})
        return torch.nn.functional.cross_entropy(self.net(clean), y) + 0 * outputs.sum()


def fit(model, epochs=2) -> None:
    labels = torch.randint(0, 3, (worker.N_SAMPLES,), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(IndexedDataset(TensorDataset(worker.inputs(), labels)), batch_size=worker.BATCH_SIZE)
    schedule = [{"name": "distill", "start_epoch": 0, "distillation": True}]
    pl.Trainer(max_epochs=epochs, callbacks=[StageScheduleCallback(stage_schedule=schedule, verbose=False)],
               logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               accelerator="cpu", num_sanity_val_steps=0).fit(model, loader)


def test_a_served_batch_whose_inputs_changed_in_place_refuses_its_deferred_feature():
    def call(model, x, index):
        outputs = model.run_teachers(x, sample_index=index)["teacher"]
        x.mul_(0.0).add_(1.0)  # the student's own in-place transform, after the teachers ran
        return outputs, model.captured_features("teacher")["1"]

    model = DeferredStudent(call)
    with pytest.raises(DistillationStepError, match="changed in place after run_teachers"):
        fit(model)
    assert [step["epoch"] for step in model.seen] == [0] * STEPS  # the live epoch ran; the first served step refused
    assert model.teacher_calls == STEPS
    teacher = worker.make_teacher()
    for step in model.seen:
        with torch.no_grad():
            torch.testing.assert_close(step["feature"], torch.tanh(teacher[0](step["x"])), rtol=0, atol=0)


def test_a_deferred_feature_is_computed_under_the_autocast_run_teachers_ran_under():
    def call(model, x, index):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model.run_teachers(x, sample_index=index)["teacher"]
        return outputs, model.captured_features("teacher")["1"]  # read after leaving the autocast

    model = DeferredStudent(call)
    fit(model)
    assert [step["epoch"] for step in model.seen] == [0] * STEPS + [1] * STEPS
    assert model.teacher_calls == 2 * STEPS  # epoch 1: the outputs served, the teacher run for its feature
    teacher = worker.make_teacher()
    for step in model.seen:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = teacher[1](teacher[0](step["x"]))
        assert expected.dtype == torch.bfloat16
        torch.testing.assert_close(step["feature"], expected, rtol=0, atol=0)
    for live, served in zip(model.seen[:STEPS], model.seen[STEPS:]):  # the loader's order: the same batches
        assert torch.equal(live["x"], served["x"]) and torch.equal(live["feature"], served["feature"])
