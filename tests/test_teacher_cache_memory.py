"""The in-memory teacher cache's read of a batch whose sample indices come as a tensor (the usual batch): through the
index-to-slot table while the indices are compact, through the slots when they are sparse. Either way a row is
served only when it is stored, for the same input, and its values are the ones stored for that sample."""

from __future__ import annotations

import pytest
import torch

from lightning_stages import TeacherCache
from lightning_stages.distillation.teacher_cache_storage import MemoryRows

SAMPLES = 40
INPUTS = torch.randn(SAMPLES, 6, generator=torch.Generator().manual_seed(0))
OUTPUTS = torch.randn(SAMPLES, 3, generator=torch.Generator().manual_seed(1))  # "the teacher's output" per sample


def stored_cache(indices: list[int], offset: int = 0) -> TeacherCache:
    """A cache holding, for sample ``offset + i``, row ``i`` of OUTPUTS computed from row ``i`` of INPUTS."""
    cache = TeacherCache()
    cache.bind("fingerprint")
    for start in range(0, len(indices), 8):
        rows = indices[start:start + 8]
        cache.store(torch.tensor([offset + i for i in rows]), {"t": OUTPUTS[rows]}, {}, inputs=((INPUTS[rows],), {}))
    return cache


def read(cache: TeacherCache, rows: list[int], offset: int = 0, inputs: torch.Tensor | None = None):
    index = torch.tensor([offset + i for i in rows])
    return cache.lookup(index, inputs=((INPUTS[rows] if inputs is None else inputs,), {}))


@pytest.mark.parametrize("offset", [0, 10**9], ids=["compact indices: the table", "sparse indices: the slots"])
def test_a_stored_batch_is_served_in_the_order_asked_with_its_own_values(offset):
    cache = stored_cache(list(range(SAMPLES)), offset)
    table = cache._storage._table  # type: ignore[union-attr]
    assert (table is not None) == (offset == 0)  # a table of 10**9 entries for 40 samples would be mostly empty
    rows = [7, 3, 39, 0, 21, 3]
    hit = read(cache, rows, offset)
    assert hit is not None
    torch.testing.assert_close(hit[0]["t"], OUTPUTS[rows], rtol=0, atol=0)
    assert cache.take_stats() == {"hits": 6, "misses": 0, "mismatches": 0}


@pytest.mark.parametrize("missing", [5, SAMPLES + 3, 10**6], ids=["a hole", "just past the table", "far past it"])
def test_a_batch_with_a_sample_not_stored_is_not_served_and_counted_missed(missing):
    cache = stored_cache([i for i in range(SAMPLES) if i != 5])
    index = torch.tensor([1, 2, missing])
    inputs = torch.cat([INPUTS[[1, 2]], torch.zeros(1, 6)])
    assert cache.lookup(index, inputs=((inputs,), {})) is None
    assert cache.take_stats() == {"hits": 0, "misses": 3, "mismatches": 0}


def test_a_row_stored_for_another_input_is_not_served_and_counted_mismatched():
    cache = stored_cache(list(range(SAMPLES)))
    changed = INPUTS[[4, 9, 11]].clone()
    changed[1, 2] += 1.0  # sample 9's input differs from the one its row was computed from
    assert read(cache, [4, 9, 11], inputs=changed) is None
    assert cache.take_stats() == {"hits": 0, "misses": 2, "mismatches": 1}


def test_a_table_read_matches_a_read_by_a_list_of_indices():
    cache = stored_cache(list(range(0, SAMPLES, 2)))  # every other sample
    rows = [38, 0, 14]
    by_tensor = read(cache, rows)
    by_list = cache.lookup(rows, inputs=((INPUTS[rows],), {}))
    assert by_tensor is not None and by_list is not None
    torch.testing.assert_close(by_tensor[0]["t"], by_list[0]["t"], rtol=0, atol=0)
    torch.testing.assert_close(by_tensor[0]["t"], OUTPUTS[rows], rtol=0, atol=0)


def test_the_table_follows_new_rows_and_is_made_again_for_a_new_layout():
    rows = MemoryRows()
    layout = {"outputs": {}, "features": {}, "leaves": [((2,), "float32")], "stored": ["float32"]}
    rows.set_layout(layout)
    rows.put([3, 1], torch.tensor([30, 10]), [torch.tensor([[3.0, 3.0], [1.0, 1.0]])])
    rows.put([70000], torch.tensor([7]), [torch.tensor([[7.0, 7.0]])])  # past the table: it grows
    got, mismatched = rows.get([70000, 3], torch.tensor([7, 30]), torch.tensor([70000, 3]))
    assert mismatched == 0 and got is not None
    assert got[0].tolist() == [[7.0, 7.0], [3.0, 3.0]]
    rows.set_layout({**layout, "leaves": [((3,), "float32")]})  # another layout: nothing is stored any more
    got, mismatched = rows.get([3], torch.tensor([30]), torch.tensor([3]))
    assert got is None and mismatched == 0 and len(rows) == 0


class NoSlots(dict):
    def get(self, *args):  # the read by slots, which a stored batch of compact indices never needs
        raise AssertionError("read by slots")


@pytest.mark.parametrize("checked", [True, False], ids=["inputs checked", "no inputs given"])
def test_a_stored_batch_of_compact_indices_is_read_through_the_table_alone(checked):
    cache = stored_cache(list(range(SAMPLES)))
    storage = cache._storage
    storage._slot = NoSlots(storage._slot)  # type: ignore[union-attr]
    rows = [12, 30, 2]
    index = torch.tensor(rows)
    hit = cache.lookup(index, inputs=((INPUTS[rows],), {})) if checked else cache.lookup(index)
    assert hit is not None
    torch.testing.assert_close(hit[0]["t"], OUTPUTS[rows], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rows_stored_under_a_bf16_autocast_are_stored_and_served(dtype):
    """A ``Trainer(precision="bf16-mixed")`` with ``teacher_precision="16-mixed"``: the store ran under the CPU bf16
    autocast, whose ``torch.cat`` refused float16 rows (a raw ``RuntimeError``, then an ``IndexError`` at every read)."""
    cache = TeacherCache()
    cache.bind("fingerprint")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, 16, 4):  # four stores: the rows grow three times
            rows = list(range(start, start + 4))
            cache.store(torch.tensor(rows), {"t": OUTPUTS[rows].to(dtype)}, {}, inputs=((INPUTS[rows],), {}))
        hit = read(cache, [3, 9, 0])
    assert hit is not None and torch.equal(hit[0]["t"], OUTPUTS[[3, 9, 0]].to(dtype))


def test_a_store_that_fails_leaves_none_of_its_samples_served_and_the_others_intact(monkeypatch):
    cache = stored_cache(list(range(8)))
    storage = cache._bound()
    copies = []

    def failing_copy(self, dim, index, source):  # the checksums' copy fails: the leaf's wrote the new rows
        copies.append(1)
        if len(copies) == 2:
            raise RuntimeError("disk full, say")
        return original(self, dim, index, source)

    original = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_", failing_copy)
    other = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="disk full"):  # samples 6, 7 stored again (new values), 8, 9 new
        storage.put([6, 7, 8, 9], torch.arange(4), [other, other])
    monkeypatch.undo()
    assert len(storage) == 6  # samples 6 and 7 are forgotten: their rows may hold part of the failed batch
    assert read(cache, [6]) is None and read(cache, [8]) is None
    hit = read(cache, [5, 0])
    assert hit is not None and torch.equal(hit[0]["t"], OUTPUTS[[5, 0]])
    # new samples get new slots, never one a forgotten sample's rows may be read from
    cache.store(torch.tensor([20, 6]), {"t": OUTPUTS[[20, 6]]}, {}, inputs=((INPUTS[[20, 6]],), {}))
    hit = read(cache, [20, 6, 5])
    assert hit is not None and torch.equal(hit[0]["t"], OUTPUTS[[20, 6, 5]])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64,
                                   torch.float16, torch.bool])
@pytest.mark.parametrize("offset", [0, 10**9], ids=["table", "slots"])
def test_outputs_of_any_dtype_are_stored_in_memory_byte_for_byte(dtype, offset):
    """float8 and unsigned 16- to 64-bit teacher outputs (which the CPU cannot index_copy_ or cat) are kept and served
    with their bytes, in their dtype; they raised NotImplementedError from the training step."""
    raw = torch.randint(0, 256, (12, 2 * torch.empty((), dtype=dtype).element_size()), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(4))
    if dtype == torch.bool:
        raw = raw % 2
    outputs = raw.view(dtype)  # arbitrary bytes (NaN payloads of float8 included), 2 values a sample
    cache = TeacherCache()
    cache.bind("fingerprint")
    x = torch.arange(12.0).unsqueeze(1)
    cache.store(torch.arange(offset, offset + 8), {"t": outputs[:8]}, {}, inputs=((x[:8],), {}))
    cache.store(torch.arange(offset + 8, offset + 12), {"t": outputs[8:]}, {}, inputs=((x[8:],), {}))  # it grows
    order = [11, 0, 5, 8]
    hit = cache.lookup(torch.tensor([offset + i for i in order]), inputs=((x[order],), {}))
    assert hit is not None
    served = hit[0]["t"]
    assert served.dtype == dtype
    assert torch.equal(served.view(torch.uint8), raw[order])
