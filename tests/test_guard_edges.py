"""The checkpoint guard's edges: save_on_exception is given back after the fit that muted it; the guard reads
nothing on an error after which ModelCheckpoint does not save (a rank-local error must not wait in a gather); an
uninitialised lazy parameter is not read; the teacher cache's growth warning after its directory was deleted."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from conftest import TinyNet, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_nonfinite import NaNAt, tiny_loader

import lightning_stages.checkpoint_guard as guard_module
from lightning_stages import DistillationStepError, StageScheduleCallback, TeacherCache


class RaisesAt(TinyNet):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.at = step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.at:
            raise RuntimeError("an ordinary error")
        return super().training_step(batch, batch_idx)


def test_save_on_exception_is_given_back_when_the_fit_that_muted_it_ends(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}", save_on_exception=True)
    run = trainer(tmp_path, max_epochs=3, callbacks=[StageScheduleCallback(), checkpoints], enable_checkpointing=True)
    with warnings.catch_warnings(), pytest.raises(DistillationStepError):
        warnings.simplefilter("ignore")
        run.fit(NaNAt(epoch=1, batch=1), tiny_loader())
    assert checkpoints.save_on_exception  # the user's object, as given
    # the same ModelCheckpoint in a new Trainer with a new callback: an ordinary error saves its checkpoint
    again = trainer(tmp_path / "2", max_epochs=3, callbacks=[StageScheduleCallback(), checkpoints],
                    enable_checkpointing=True)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="an ordinary error"):
        warnings.simplefilter("ignore")
        again.fit(RaisesAt(6), tiny_loader())
    assert "step=6.ckpt" in {p.name for p in (tmp_path / "ckpt").iterdir()}


def test_no_weights_are_read_on_an_error_after_which_modelcheckpoint_does_not_save(tmp_path, monkeypatch):
    """At global step 0 (or right after a save) Lightning's ModelCheckpoint does not save on an exception, so it
    waits for no other rank: nor may the guard (under DDP, a rank-local error would wait in the gather for ever)."""
    reads = []
    real = guard_module.nonfinite_weight
    monkeypatch.setattr(guard_module, "nonfinite_weight", lambda *a, **k: reads.append(1) or real(*a, **k))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_exception=True)
    run = trainer(tmp_path, max_epochs=1, callbacks=[StageScheduleCallback(), checkpoints], enable_checkpointing=True)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="an ordinary error"):
        warnings.simplefilter("ignore")
        run.fit(RaisesAt(0), tiny_loader())
    assert reads == []


def test_no_growth_warning_after_the_directory_was_deleted_and_made_again(tmp_path):
    teacher, x = torch.nn.Linear(4, 3), torch.randn(400, 4)
    cache = TeacherCache(tmp_path / "kd")
    cache.bind("k")

    def epoch() -> None:
        for index in torch.arange(400).split(8):
            if cache.lookup(index, inputs=x[index]) is None:
                with torch.no_grad():
                    cache.store(index, {"t": teacher(x[index])}, {}, inputs=x[index])

    epoch()
    shutil.rmtree(tmp_path / "kd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epoch()  # 400 rows for 400 samples again: not a run that grows
    assert not [w for w in caught if "rows stored" in str(w.message)], [str(w.message) for w in caught]


def test_an_uninitialised_lazy_parameter_is_not_read_and_the_others_are():
    # a LazyLinear's weight before its first forward has no values: reading it raised a raw ValueError
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LazyLinear(1))
    assert guard_module.nonfinite_weight(model) is None
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    assert guard_module.nonfinite_weight(model) == "`0.bias`"


@pytest.mark.parametrize(("dtype", "values"), [
    (torch.float32, [3e38, 3e38, -1.0]),  # finite values whose float32 sum overflows
    (torch.float16, [60000.0] * 4),  # summed in float32: past float16's largest value (65504), still finite
    (torch.bfloat16, [3e38, 3e38]),
    (torch.float64, [1e308, 1e308]),
])
def test_finite_weights_whose_sum_overflows_are_finite(dtype, values):
    # the weights are read by their sums first; a sum that overflows must not stop a run whose values are all finite
    model = torch.nn.Linear(len(values), 1).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([values], dtype=torch.float64).to(dtype))
    assert torch.isfinite(model.weight).all()
    assert guard_module.nonfinite_weight(model) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64])
@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]])
@pytest.mark.filterwarnings("ignore:Complex modules")
def test_every_non_finite_value_is_found_and_named(dtype, bad):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)
    assert guard_module.nonfinite_weight(model) is None
    with torch.no_grad():
        for i, value in enumerate(bad):
            model[1].weight[i, 1] = value
    assert guard_module.nonfinite_weight(model) == "`1.weight`"


@pytest.mark.parametrize("rank0", ["finite", "overflowing"])
def test_every_rank_gathers_alike_when_another_rank_holds_a_nan(rank0):
    # two ranks, simulated: rank 0's weights are finite (their sum too, or a sum that overflows), rank 1's hold a NaN.
    # First each rank runs alone, to record what it hands to each gather; then each rank runs against the other's
    # records, as all_gather gives them: both must gather equally often (a rank that gathered once while the other
    # waits in a second gather would hang DDP) and agree that rank 1 holds the NaN
    models = [torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)]
    with torch.no_grad():
        if rank0 == "overflowing":
            models[0].weight.copy_(torch.tensor([[3e38, 3e38]]))
        models[1].bias.fill_(float("nan"))
    records: list[list[torch.Tensor]] = [[], []]

    def alone(rank):
        def gather(value):
            records[rank].append(value)
            return value.reshape(1)
        return gather

    for rank in (0, 1):
        guard_module.nonfinite_weight(models[rank], alone(rank))
    other = {0: records[1], 1: records[0]}
    calls = {0: 0, 1: 0}

    def both(rank):
        def gather(value):
            theirs = other[rank][calls[rank]] if calls[rank] < len(other[rank]) else torch.tensor(0)
            calls[rank] += 1
            return torch.stack([value, theirs])
        return gather

    assert guard_module.nonfinite_weight(models[0], both(0)) == "a weight of another process"
    assert guard_module.nonfinite_weight(models[1], both(1)) == "`bias`"
    assert calls == {0: 2, 1: 2}  # both ranks gathered twice: the sums' verdict, then the values'


@pytest.mark.parametrize("dtype", [d for d in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                                               getattr(torch, "float8_e8m0fnu", None)) if d is not None])
def test_a_trainable_float8_weight_is_read(dtype):
    # isfinite refuses most float8 dtypes (NotImplementedError), and reads float8_e8m0fnu's NaN as finite
    model = torch.nn.Module()
    model.scale = torch.nn.Parameter(torch.tensor([1.0, 2.0, 4.0]).to(dtype))
    assert guard_module.nonfinite_weight(model) is None
    with torch.no_grad():
        model.scale[1] = float("nan")
    assert torch.isnan(model.scale.float()).any()
    assert guard_module.nonfinite_weight(model) == "`scale`"
