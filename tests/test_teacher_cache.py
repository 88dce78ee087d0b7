"""The teacher cache under races, kills and damage: it serves the teacher's own value for a sample, or nothing.

Every value read back is compared with the teacher run in the test on that sample alone. Processes that race or
die are real: ``multiprocessing`` (fork) children and a 2-rank DDP fit (``tests/_cache_ddp_worker.py``); kills are
SIGKILLs at a fixed point in the code, never timed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import _cache_ddp_worker as worker
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import ddp_env
from torch.utils.data import DataLoader, TensorDataset

from lightning_stages import IndexedDataset, StageConfigError, StageScheduleCallback, TeacherCache
from lightning_stages.distillation import teacher_cache_inputs, teacher_cache_shards
from lightning_stages.distillation.teacher_cache_bytes import byte_hash
from lightning_stages.distillation.teacher_cache_inputs import input_fingerprints
from lightning_stages.distillation.teacher_cache_rows import row_hash, word_hash
from lightning_stages.distillation.teacher_fingerprint import teacher_fingerprint
from lightning_stages.errors import DistillationStepError

WORKER = Path(__file__).with_name("_cache_ddp_worker.py")
FORK = multiprocessing.get_context("fork")  # children start at once, without importing torch again


def reference(index) -> torch.Tensor:
    return worker.reference(worker.make_teacher(), list(index))


def fill(directory, samples=range(16), key="t", chunk=4) -> None:
    """Store the teacher's outputs for ``samples``, ``chunk`` per batch, with one cache object (one shard)."""
    teacher, x = worker.make_teacher(), worker.inputs()
    cache = TeacherCache(directory)
    cache.bind(key)
    with torch.no_grad():
        for index in torch.tensor(list(samples), dtype=torch.long).split(chunk):
            cache.store(index, {"t": teacher(x[index])}, {}, inputs=x[index])
    cache.close()


def read(directory, index, key="t"):
    """What a new cache object serves for ``index`` (``None``: nothing)."""
    cache = TeacherCache(directory)
    cache.bind(key)
    x = worker.inputs()
    found = cache.lookup(index, inputs=x[index])
    cache.close()
    return None if found is None else found[0]["t"]


def served(directory, key="t") -> set[int]:
    """The samples of 0..15 a new cache serves, each checked against the teacher."""
    result = set()
    for sample in range(16):
        value = read(directory, [sample], key)
        if value is not None:
            torch.testing.assert_close(value, reference([sample]))
            result.add(sample)
    return result


def shards(directory) -> list[Path]:
    return sorted(Path(directory).glob("tc2-*/*.rows"))


def header(path: Path) -> tuple[int, int]:
    """``(offset of the first record, bytes per record)`` of a shard file."""
    data = path.read_bytes()
    length = int.from_bytes(data[8:12], "little")
    return -(-(16 + length) // 8) * 8, json.loads(data[16 : 16 + length])["record_bytes"]


# ------------------------------------------------------------------------------------------------ checksums


MASK64 = (1 << 64) - 1


def python_multiplier(position: int) -> int:
    """The odd multiplier of a word position (from 1), written out in Python: the high 31 bits from splitmix64's
    first steps, the low 33 bits 2 * p + 1 for p a multiply-xorshift bijection of the position's low 31 bits."""
    m = (position * 0x9E3779B97F4A7C15) & MASK64
    m = ((m ^ ((m >> 31) & 0xFFFFFFFF)) * 0xBF58476D1CE4E5B9) & MASK64
    low = (position & (2**31 - 1)) * 0x2C1B3C6D % 2**31
    low ^= low >> 16
    low = low * 0x297A2D39 % 2**31
    low ^= low >> 15
    return (m & ~(2**33 - 1) & MASK64) | (2 * low + 1)


def signed64(total: int) -> int:
    total &= MASK64
    return total - (1 << 64) if total >= 1 << 63 else total


def _python_word_hash(words: list[int]) -> int:
    """word_hash of one row in plain Python: each 32-bit word, signed, times the odd multiplier of its position
    (from 1), summed modulo 2**64."""
    return signed64(sum(w * python_multiplier(p) for p, w in enumerate(words, start=1)))


def _python_byte_hash(row: bytes) -> int:
    """byte_hash of one row in plain Python: zero bytes up to a multiple of 4, read as little-endian signed 32-bit
    words, then _python_word_hash."""
    row = row + bytes(-len(row) % 4)
    return _python_word_hash([int.from_bytes(row[i:i + 4], "little", signed=True) for i in range(0, len(row), 4)])


def test_word_hash_and_row_hash_equal_a_python_reference():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31, (5, 9), dtype=torch.int64, generator=gen).to(torch.int32)
    words[0] = -(2**31)  # the extremes: the products and sums wrap as in Python modulo 2**64
    words[1] = 2**31 - 1
    assert word_hash(words).tolist() == [_python_word_hash(row) for row in words.tolist()]
    wide = torch.randint(-(2**63), 2**63 - 1, (5, 7), generator=gen)
    halves = [[h for w in row for h in (w & 0xFFFFFFFF, w >> 32)] for row in wide.tolist()]  # low half first
    assert row_hash(wide).tolist() == [_python_word_hash([h - 2**32 if h >= 2**31 else h for h in row])
                                       for row in halves]
    assert torch.equal(row_hash(wide[:, 1:]), row_hash(wide[:, 1:].clone()))  # a slice with strides (7, 1)


@pytest.mark.parametrize("columns", [1, 2, 4])
def test_word_hash_in_blocks_of_columns_gives_the_same_checksum(monkeypatch, columns):
    """A batch of large inputs is widened a block of columns at a time (so that the copy stays small): the same sums,
    the constant added once."""
    from lightning_stages.distillation import teacher_cache_rows

    words = torch.randint(-(2**31), 2**31, (5, 9), dtype=torch.int64, generator=torch.Generator().manual_seed(3))
    words = words.to(torch.int32)
    monkeypatch.setattr(teacher_cache_rows, "_WIDENED_BYTES", 8 * 5 * columns)
    expected = [_python_word_hash(row) for row in words.tolist()]
    assert word_hash(words).tolist() == expected
    assert word_hash(words, torch.tensor(7)).tolist() == [signed64(h + 7) for h in expected]
    assert word_hash(words[:, :0], torch.tensor(7)).tolist() == [7] * 5  # no words: the constant alone


def test_row_hash_sees_two_flipped_signs():
    """Two stored float32 values with their signs flipped (the top bit of two 64-bit words: a sum of the 64-bit words
    times odd multipliers cannot see an even number of those, and the earlier checksum, which mixed each product
    with its own shifted bits, missed about half of the pairs): every pair of 32 words changes the checksum."""
    words = torch.randn(1, 64).view(torch.int64)
    base = row_hash(words)
    pairs = [(i, j) for i in range(32) for j in range(i + 1, 32)]
    changed = words.repeat(len(pairs), 1)
    for k, (i, j) in enumerate(pairs):
        changed[k, i] ^= -(2**63)
        changed[k, j] ^= -(2**63)
    assert (row_hash(changed) != base).all()
    negated = torch.randn(len(pairs), 64)  # the same with float32 inputs, through byte_hash
    flipped = negated.clone()
    at = torch.arange(len(pairs))
    flipped[at, torch.tensor([2 * i + 1 for i, _ in pairs])] *= -1
    flipped[at, torch.tensor([2 * j + 1 for _, j in pairs])] *= -1
    assert (byte_hash(flipped.view(torch.int8)) != byte_hash(negated.view(torch.int8))).all()
    # a long row (one 3 x 224 x 224 float32 image): pairs of positions whose pseudo-random multipliers were equal or
    # opposite modulo 2**33 (this checksum's first multipliers had three such pairs in it), and pairs far apart
    image = torch.randn(1, 3 * 224 * 224).abs()
    for i, j in [(119743, 131367), (59871, 65683), (47881, 56352), (0, 150527), (1, 2)]:
        changed = image.clone()
        changed[0, i] *= -1
        changed[0, j] *= -1
        assert byte_hash(changed.view(torch.int8)) != byte_hash(image.view(torch.int8)), (i, j)
        before = image.clone()
        before[0, i], before[0, j] = 3.0, -3.0
        after = image.clone()
        after[0, i], after[0, j] = -3.0, 3.0  # the two swapped: one sign flipped each way
        assert input_fingerprints(((after,), {}), 1) != input_fingerprints(((before,), {}), 1), (i, j)


def _words_of(tensor: torch.Tensor) -> list[int]:
    """The signed 32-bit little-endian words of a tensor's bytes, zero bytes added up to a multiple of 4."""
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    raw += bytes(-len(raw) % 4)
    return [int.from_bytes(raw[i:i + 4], "little", signed=True) for i in range(0, len(raw), 4)]


def test_every_tensor_of_an_input_takes_its_own_word_positions():
    """A change of the words of a sample's tensors moves its checksum by sum(change * multiplier of the position),
    the positions running on from one tensor to the next in the order of the arguments, a tensor that is not
    per-sample (whole) among them: the Python reference, with the words of (x[0], table, mask[0]) laid end to end."""
    gen = torch.Generator().manual_seed(11)
    x, table, mask = torch.randn(2, 5, generator=gen), torch.randn(1, 3, generator=gen), torch.randn(2, 2, 2)
    changed_x, changed_table, changed_mask = x.clone(), table.clone(), mask.clone()
    changed_x[0, 4] = 7.0
    changed_table[0, 0] = -changed_table[0, 0]
    changed_mask[0, 1, 0] = 0.5
    before = input_fingerprints(((x, table), {"mask": mask}), 2)
    after = input_fingerprints(((changed_x, changed_table), {"mask": changed_mask}), 2)
    old = _words_of(x[0]) + _words_of(table) + _words_of(mask[0])
    new = _words_of(changed_x[0]) + _words_of(changed_table) + _words_of(changed_mask[0])
    moved = sum((b - a) * python_multiplier(p) for p, (a, b) in enumerate(zip(old, new), start=1))
    assert int(after[0]) == signed64(int(before[0]) + moved)
    # the second sample changed only in the table, which every row holds whole
    moved_table = sum((b - a) * python_multiplier(p) for p, (a, b) in enumerate(zip(old, new), start=1) if 5 < p <= 8)
    assert int(after[1]) == signed64(int(before[1]) + moved_table)


def test_two_flipped_signs_in_two_tensors_of_an_input_are_seen():
    """Pairs of positions where two flipped signs went unseen when each tensor's words took the positions from 1
    (a per-sample x and mask combined as 31 * hash(x) + hash(mask); a shared table summed modulo 2**63), so the cache
    served the row stored for the other input."""
    gen = torch.Generator().manual_seed(0)
    x, mask = torch.rand(2, 32000, generator=gen) + 0.5, torch.rand(2, 32000, generator=gen) + 0.5
    flipped_x, flipped_mask = x.clone(), mask.clone()
    flipped_x[0, 25263] *= -1
    flipped_mask[0, 31837] *= -1
    assert not served_for(((x, mask), {}), ((flipped_x, flipped_mask), {}))
    table = torch.rand(1, 90000, generator=gen) + 0.5  # one row for a batch of two: hashed whole, in every row
    flipped = table.clone()
    flipped[0, 34544] *= -1
    flipped[0, 80182] *= -1
    small = torch.rand(2, 4, generator=gen)
    assert not served_for(((small, table), {}), ((small, flipped), {}))
    # a sign in the table and one in the per-sample tensor after it
    flipped = table.clone()
    flipped[0, 1] *= -1
    flipped_small = small.clone()
    flipped_small[:, 2] *= -1
    assert (input_fingerprints(((small, table), {}), 2) != input_fingerprints(((flipped_small, flipped), {}), 2)).all()


def test_the_multipliers_of_a_large_sample_of_two_tensors_are_made_once():
    """An image and a mask of 1.3 million words in all: their positions follow each other, so their multipliers are
    ten blocks of their own; kept between calls (8 MiB were kept, so each call cleared and made them again)."""
    from lightning_stages.distillation import teacher_cache_rows

    image, mask = torch.randn(1, 3 * 512 * 512), torch.zeros(1, 512 * 512, dtype=torch.int64)
    input_fingerprints(((image, mask), {}), 1)
    kept = {key: id(value) for key, value in teacher_cache_rows._multipliers_cache.items()}
    assert sum(count for (_, count, _) in kept) >= 3 * 512 * 512 + 2 * 512 * 512
    input_fingerprints(((image, mask), {}), 1)
    assert {key: id(value) for key, value in teacher_cache_rows._multipliers_cache.items()} == kept


def test_a_quantized_teacher_output_is_refused_naming_it():
    cache = TeacherCache()
    cache.bind("fingerprint")
    quantized = torch.quantize_per_tensor(torch.ones(2, 3), 0.1, 0, torch.qint8)
    with pytest.raises(DistillationStepError, match=r"`output of teacher 't'` = 'torch.qint8': is a quantized tensor"):
        cache.store([0, 1], {"t": quantized}, {}, inputs=((torch.ones(2, 1),), {}))


def test_a_store_hashes_its_inputs_as_they_are_then():
    """A change between a missed lookup and the store, also through numpy or `.data` (which move no version
    counter), is in the stored row's checksum: the row is served for the input as stored, not the one looked up."""
    for write in ("numpy", "data", "in place"):
        cache = TeacherCache()
        cache.bind("fingerprint")
        x = torch.ones(2, 4)
        inputs = ((x,), {})
        assert cache.lookup([0, 1], inputs=inputs) is None
        old = x.clone()
        if write == "numpy":
            x.numpy()[:] = 5.0
        elif write == "data":
            x.data.mul_(5)
        else:
            x.mul_(5)
        cache.store([0, 1], {"t": x[:, :1] * 2}, {}, inputs=inputs)  # computed from the input as it is now
        assert cache.lookup([0, 1], inputs=((old,), {})) is None, write
        hit = cache.lookup([0, 1], inputs=((x.clone(),), {}))
        assert hit is not None and torch.equal(hit[0]["t"], torch.full((2, 1), 10.0)), write


def test_a_long_row_is_hashed_in_blocks_and_keeps_few_multipliers():
    """A tensor hashed as one row (an input that is not per-sample, or a batch of one) of 3 * 2**17 words: three
    blocks, the Python reference's sum, and only the multipliers of those three blocks kept afterwards, 8 bytes a
    word (they once took twice the row's bytes, kept per row length)."""
    from lightning_stages.distillation import teacher_cache_rows

    words = torch.randint(-(2**31), 2**31, (1, 3 << 17), dtype=torch.int64, generator=torch.Generator().manual_seed(8))
    words = words.to(torch.int32)
    teacher_cache_rows._multipliers_cache.clear()
    teacher_cache_rows._multipliers_bytes = 0
    assert word_hash(words).tolist() == [_python_word_hash(words[0].tolist())]
    kept = sum(m.numel() * 8 for m in teacher_cache_rows._multipliers_cache.values())
    assert kept == 8 * (3 << 17) and sorted(first for first, _, _ in teacher_cache_rows._multipliers_cache) == [
        0, 1 << 17, 2 << 17]


def test_no_two_positions_have_multipliers_equal_or_opposite_modulo_two_to_the_33():
    """What makes any two flipped signs seen, checked on the first 2**22 positions (a 16 MiB row of words)."""
    from lightning_stages.distillation.teacher_cache_rows import position_multipliers

    low = position_multipliers(1 << 22, torch.device("cpu")) & (2**33 - 1)
    assert (low % 2 == 1).all()
    both = torch.cat([low, (2**33 - low) % 2**33])  # each multiplier and its opposite, modulo 2**33
    assert both.unique().numel() == both.numel()
    assert [int(m) for m in position_multipliers(5, torch.device("cpu"), first=3)] == \
        [signed64(python_multiplier(p)) for p in range(4, 9)]


def test_byte_hash_equals_a_python_reference_and_sees_every_one_and_two_byte_change():
    """The input checksum, against a plain-Python reference; one changed byte always changes it, and every change of
    two bytes of these rows does too."""
    data = torch.randint(-128, 128, (3, 13), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    expected = [_python_byte_hash(bytes(row)) for row in data.view(torch.uint8).tolist()]
    assert byte_hash(data).tolist() == expected
    assert byte_hash(data[:, 1:]).tolist() == [_python_byte_hash(bytes(row[1:])) for row in data.view(torch.uint8).tolist()]
    base = byte_hash(data)
    for position in range(13):
        for delta in (1, 127, -128):
            changed = data.clone().view(torch.uint8)
            changed[:, position] += delta
            assert (byte_hash(changed.view(torch.int8)) != base).all(), (position, delta)
    for a in range(13):
        for b in range(a + 1, 13):
            changed = data.clone().view(torch.uint8)
            changed[:, a] += 1
            changed[:, b] += 128
            assert (byte_hash(changed.view(torch.int8)) != base).all(), (a, b)
    swapped = data.flip(1)
    differs = (swapped != data).any(1)
    assert (byte_hash(swapped.contiguous()) != base)[differs].all()


@pytest.mark.parametrize("constant", [0, 5, -(2**63), 2**63 - 1])
def test_byte_hash_adds_a_constant_modulo_two_to_the_64(constant):
    """The constant rides in the last operation (an addmv on the CPU); the sum wraps like the checksum's own."""
    data = torch.randint(-128, 128, (6, 100), dtype=torch.int8, generator=torch.Generator().manual_seed(6))
    wrapped = [(h + constant + 2**63) % 2**64 - 2**63 for h in byte_hash(data).tolist()]  # in Python integers
    assert byte_hash(data, torch.tensor(constant)).tolist() == wrapped


def test_byte_hash_of_long_rows_sees_a_change_and_a_move_of_halves():
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(-128, 128, (2, (1 << 15) + 40), dtype=torch.int8, generator=gen)
    assert byte_hash(data).tolist() == [_python_byte_hash(bytes(row)) for row in data.view(torch.uint8).tolist()]
    changed = data.clone()
    changed[:, -1] += 1
    assert (byte_hash(changed) != byte_hash(data)).all()
    halves = torch.randint(-128, 128, (1, 1 << 15), dtype=torch.int8, generator=gen)
    other = torch.randint(-128, 128, (1, 1 << 15), dtype=torch.int8, generator=gen)
    assert byte_hash(torch.cat([halves, other], 1)) != byte_hash(torch.cat([other, halves], 1))


def test_byte_hash_sees_every_change_of_one_byte_at_every_position_of_a_long_row():
    """Every position of a 32 KiB row, each changed by +1 and by -128: every checksum changes."""
    gen = torch.Generator().manual_seed(2)
    row = torch.randint(-128, 128, (1, 1 << 15), dtype=torch.int8, generator=gen)
    base = byte_hash(row)
    for delta in (1, -128):
        for start in range(0, 1 << 15, 4096):  # 4096 changed copies at a time (128 MiB)
            changed = row.repeat(4096, 1)
            at = torch.arange(4096)
            changed[at, start + at] = (changed[at, start + at].to(torch.int64) + delta).to(torch.int8)  # wraps
            assert (byte_hash(changed) != base).all(), (delta, start)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(6, 1).t(),  # a batch of one sample, contiguous with strides (1, 1)
    lambda: torch.randint(0, 256, (6, 1), dtype=torch.uint8).t(),
    lambda: torch.randint(0, 256, (1, 6), dtype=torch.uint8).as_strided((1, 6), (0, 1)),  # as Inductor makes them
    lambda: torch.randn(1, 4).t(),  # one value per sample, contiguous with strides (1, 4)
    lambda: torch.arange(4).reshape(1, 4).t(),
    lambda: torch.randn(6, 1, 1).permute(1, 2, 0),
])
def test_an_input_checksum_ignores_the_strides_of_dimensions_of_size_one(make):
    """A dimension of size 1 may have any stride in a contiguous tensor: the same checksum as a fresh copy's, at
    every call (an earlier checksum's kernel misread a (1, n) int8 matrix of strides (1, 1); view(torch.int8) refused
    (n, 1) float32 rows of strides (1, n))."""
    x = make()
    assert x.is_contiguous() and x.stride() != torch.empty_like(x, memory_format=torch.contiguous_format).stride()
    expected = input_fingerprints(((x.reshape(-1).clone().view(x.shape),), {}), x.shape[0])
    for _ in range(3):
        assert torch.equal(input_fingerprints(((x,), {}), x.shape[0]), expected)
        assert torch.equal(input_fingerprints(([x], {}), x.shape[0]), input_fingerprints(([x.clone()], {}), x.shape[0]))
    data = x.reshape(x.shape[0], -1).view(torch.uint8) if x.dtype == torch.uint8 else None
    if data is not None:  # byte_hash itself, on such a matrix
        data = data.view(torch.int8)
        assert torch.equal(byte_hash(data), byte_hash(data.clone().reshape(-1).view(data.shape)))


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 6),  # whole 8-byte words per row: read in place
    lambda: torch.randn(4, 6, dtype=torch.float64),
    lambda: torch.randn(21)[1:].view(4, 5),  # contiguous, but not from a whole word of its storage
    lambda: torch.randn(4, 5)[:, :4],  # rows of whole words, strides not
    lambda: torch.randn(4, 7).half(),  # 14 bytes per row: padded
    lambda: torch.randn(6, 4).t(),  # not contiguous
    lambda: torch.rand(4, 5) > 0.5,  # bool
])
def test_an_input_checksum_changes_in_the_changed_row_only(make):
    x = make()
    changed = x.clone()
    changed[2, -1] = ~changed[2, -1] if x.dtype == torch.bool else changed[2, -1] + 1
    before, after = input_fingerprints(((x,), {}), 4), input_fingerprints(((changed,), {}), 4)
    assert (before != after).tolist() == [False, False, True, False]


@pytest.mark.parametrize("x", [torch.randn(4, 6), torch.randint(0, 9, (4, 3, 2)), torch.rand(4, 5) > 0.5,
                               torch.randn(4, 7).half(), torch.randn(6, 4).t(), torch.zeros(4, 0), torch.arange(4),
                               # 4-byte values read in place as words: 3-d, int32, a slice, a tensor with a gradient
                               torch.randn(4, 3, 5), torch.randint(-9, 9, (4, 3), dtype=torch.int32),
                               torch.randn(5, 6)[1:], torch.randn(4, 6, requires_grad=True)])
def test_the_lone_tensor_shortcut_gives_the_checksums_of_the_walk_over_any_inputs(x):
    inputs = ((x,), {})
    assert teacher_cache_inputs._lone_batch_tensor(inputs, 4) is x  # run_teachers(x): the shortcut is taken
    assert torch.equal(input_fingerprints(inputs, 4), teacher_cache_inputs._walk(inputs, 4, hash_rows=True))
    for other in (((x,), {"scale": 2.0}), ((x, x), {}), [(x,), {}]):  # the walk: other inputs, other checksums
        assert teacher_cache_inputs._lone_batch_tensor(other, 4) is None
        assert (input_fingerprints(other, 4) != input_fingerprints(inputs, 4)).all()


def test_an_input_and_its_negation_have_other_checksums():
    x = torch.randn(4, 6, dtype=torch.float64)  # each row: 6 sign bits flip, in whole 8-byte words
    assert (input_fingerprints(((x,), {}), 4) != input_fingerprints(((-x,), {}), 4)).all()


def test_rows_without_elements_have_a_checksum_of_their_shape():
    empty = input_fingerprints(((torch.zeros(4, 0),), {}), 4)
    assert empty.tolist() == input_fingerprints(((torch.zeros(4, 0),), {}), 4).tolist()
    assert (empty != input_fingerprints(((torch.zeros(4, 0, 2),), {}), 4)).all()


def served_for(first, second) -> bool:
    """Whether rows stored for the teachers' inputs ``first`` are served for ``second`` (both ``(args, kwargs)``)."""
    cache = TeacherCache()
    cache.bind("fingerprint")
    cache.store([0, 1], {"t": torch.tensor([[1.0], [2.0]])}, {}, inputs=first)
    return cache.lookup([0, 1], inputs=second) is not None


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    scale: float = 1.0


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
Y = torch.randn(2, 4, generator=torch.Generator().manual_seed(4))
LONG = "a" * 1000


@pytest.mark.parametrize(("first", "second"), [
    (((X,), {"scale": 1.0}), ((X,), {"scale": 2.0})),  # the same tensor object, another plain argument
    (((X,), {}), ((), {"x": X})),  # a positional argument, then a keyword one
    (((X.to_sparse(),), {}), ((Y.to_sparse(),), {})),
    (((X.to_sparse_csr(),), {}), ((Y.to_sparse_csr(),), {})),
    (((Batch(X),), {}), ((Batch(Y),), {})),
    (((Batch(X),), {}), ((Batch(X, 2.0),), {})),
    (((X.numpy(),), {}), ((Y.numpy(),), {})),
    (((X,), {"k": np.int64(1)}), ((X,), {"k": np.int64(2)})),
    ((([LONG + "X"],), {}), (([LONG + "Y"],), {})),  # strings that differ after 1000 characters
    (((X.to(torch.complex64),), {}), ((X.to(torch.complex64).conj(),), {})),
    (((X,), {}), ((X._neg_view(),), {})),
], ids=["plain argument", "argument kind", "sparse COO", "sparse CSR", "dataclass tensor", "dataclass field",
        "numpy array", "numpy scalar", "long string", "conjugate view", "negative view"])
def test_a_row_is_not_served_for_other_inputs(first, second):
    assert served_for(first, first)
    assert not served_for(first, second)


def test_an_input_changed_behind_torch_s_back_is_not_served():
    array = np.ones((2, 4), dtype=np.float32)
    shared = torch.from_numpy(array)  # numpy writes do not bump the tensor's version
    cache = TeacherCache()
    cache.bind("fingerprint")
    cache.store([0, 1], {"t": torch.ones(2, 1)}, {}, inputs=((shared,), {}))
    assert cache.lookup([0, 1], inputs=((shared,), {})) is not None
    array[1] = 5.0
    assert cache.lookup([0, 1], inputs=((shared,), {})) is None
    detached = torch.ones(2, 4)
    cache.store([0, 1], {"t": torch.ones(2, 1)}, {}, inputs=((detached,), {}))
    detached.data.mul_(2)  # `.data` has a version counter of its own
    assert cache.lookup([0, 1], inputs=((detached,), {})) is None


def test_inference_mode_inputs_are_checked():
    with torch.inference_mode():
        x = torch.randn(2, 4)
    assert served_for(((x,), {}), ((x,), {}))
    assert not served_for(((x,), {}), ((x + 1,), {}))


def test_a_numpy_batch_is_checked_row_by_row():
    changed = X.numpy().copy()
    changed[1, 0] += 1
    before, after = input_fingerprints(((X.numpy(),), {}), 2), input_fingerprints(((changed,), {}), 2)
    assert (before != after).tolist() == [False, True]


def test_an_input_the_checksum_cannot_cover_is_refused_naming_it():
    cache = TeacherCache()
    cache.bind("fingerprint")
    with pytest.raises(DistillationStepError) as info:
        cache.lookup([0, 1], inputs=((X,), {"fn": lambda v: v}))
    assert "inputs" in str(info.value) and "function" in str(info.value)


@pytest.mark.parametrize("index", [["a", "b"], [None, 1], "ab"])
def test_a_sample_index_that_is_not_integers_is_refused_naming_it(index):
    cache = TeacherCache()
    cache.bind("fingerprint")
    with pytest.raises(DistillationStepError) as info:
        cache.lookup(index, inputs=((X,), {}))
    assert "sample_index" in str(info.value)


# ------------------------------------------------------------------------------------------------ concurrency


def test_processes_with_the_same_and_with_other_teachers_and_dtypes_race_on_one_directory(tmp_path):
    # (teacher seed, stored dtype) of the caches of each process: the first teacher in float32 in both, another
    # teacher in one, float16 in the other
    runs = [[(7, None), (8, None)], [(7, None), (7, torch.float16)]]
    barrier, results = FORK.Barrier(len(runs)), FORK.Queue()
    procs = [FORK.Process(target=worker.hammer, args=(str(tmp_path), caches, 200, barrier, results)) for caches in runs]
    for proc in procs:
        proc.start()
    try:
        reports = [report for _ in procs for report in results.get(timeout=120)]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert len(reports) == 4
    for report in reports:
        assert report["hits"] > 0, report  # the cache was read, not only filled
        # float32 rows equal the process's own teacher (up to batch-dependent rounding); float16 rows its rounding
        assert report["worst"] <= (2e-3 if report["dtype"] == "torch.float16" else 1e-5), report


def test_two_ddp_ranks_share_one_cache_directory(tmp_path):
    env = ddp_env()
    cmd = [sys.executable, str(WORKER), "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    teacher, x = worker.make_teacher(), worker.inputs()
    steps_per_epoch = worker.N_SAMPLES // 2 // worker.BATCH_SIZE
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(result["seen"]) == worker.EPOCHS * steps_per_epoch
        assert result["teacher_calls"] == steps_per_epoch  # epoch 0 only: later epochs read both ranks' rows
        for step in result["seen"]:
            torch.testing.assert_close(torch.tensor(step["logits"]), worker.reference(teacher, step["index"]))
            with torch.no_grad():
                hidden = torch.tanh(teacher[0](x[step["index"]]))
            torch.testing.assert_close(torch.tensor(step["hidden"]), hidden)
        first = {i for step in result["seen"] if step["epoch"] == 0 for i in step["index"]}
        later = {i for step in result["seen"] if step["epoch"] > 0 for i in step["index"]}
        assert later - first, "no sample stored by the other rank was read"


def test_a_live_run_keeps_its_rows_while_another_teacher_binds_the_directory(tmp_path):
    fill(tmp_path, key="a")
    live = TeacherCache(tmp_path)
    live.bind("a")
    other = TeacherCache(tmp_path)
    other.bind("b")  # deletes the entries of keys nobody uses, not those of a live process
    assert len(live) == 16 and other.lookup([0]) is None
    live.close()
    other.clear()
    assert served(tmp_path, key="a") == set()


# ------------------------------------------------------------------------------------------------ kills


def _run_until_killed(target, directory) -> int:
    proc = FORK.Process(target=target, args=(str(directory),))
    proc.start()
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
    return proc.exitcode


def test_a_kill_mid_write_serves_the_complete_rows_and_recomputes_the_torn_ones(tmp_path):
    assert _run_until_killed(worker.die_mid_write, tmp_path) == -signal.SIGKILL
    (shard,) = shards(tmp_path)
    offset, record = header(shard)
    assert (shard.stat().st_size - offset) % record != 0  # a torn record at the end
    # the first batch, and the four whole records of the second one; sample 12 is torn, 13-15 were never written
    assert served(tmp_path, key="kill") == set(range(12))
    fill(tmp_path, range(12, 16), key="kill")
    assert served(tmp_path, key="kill") == set(range(16))


def test_a_kill_mid_drop_leaves_rows_that_are_read_correctly_or_dropped(tmp_path):
    fill(tmp_path, range(8), key="old")
    fill(tmp_path, range(8, 16), key="old")  # a second shard
    assert _run_until_killed(worker.die_mid_drop, tmp_path) == -signal.SIGKILL
    assert len(shards(tmp_path)) == 1  # one of the old key's two shards is left
    assert served(tmp_path, key="old") in (set(range(8)), set(range(8, 16)))
    new = TeacherCache(tmp_path)
    new.bind("new")  # the next run with another teacher drops the rest
    assert shards(tmp_path) == [] and len(list(tmp_path.glob("tc2-*"))) == 1


# ------------------------------------------------------------------------------------------------ damage


def _damage(path: Path, kind: str) -> set[int]:
    """Damage the shard holding samples 0..15 (in order); return the samples that must still be served."""
    offset, record = header(path)
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(data[: offset + 10 * record + record // 2]))
        return set(range(10))
    if kind == "missing":
        path.unlink()
        return set()
    if kind in ("flipped", "nan"):
        at = offset + 5 * record + 24
        data[at : at + 4] = struct.pack("<f", math.nan) if kind == "nan" else bytes([data[at] ^ 0x10, *data[at + 1:at + 4]])
        path.write_bytes(bytes(data))
        return set(range(16)) - {5}
    if kind == "zero-extended":
        os.truncate(path, len(data) + 4 * record)  # reads as four records of zeros, "sample 0"
        return set(range(1, 16))
    if kind == "header":
        data[20] ^= 0x01
        path.write_bytes(bytes(data))
        return set()
    assert kind == "metadata"  # a valid checksum over a header that makes no sense
    body = json.dumps({"format": teacher_cache_shards._FORMAT, "key": path.parent.name[4:], "layout": {"leaves": "12x"},
                       "record_bytes": "12x"})
    head = b"LSTCROW2" + len(body).to_bytes(4, "little") + zlib.crc32(body.encode()).to_bytes(4, "little")
    path.write_bytes(head + body.encode() + bytes(data[offset:]))
    return set()


@pytest.mark.parametrize("kind", ["truncated", "missing", "flipped", "nan", "zero-extended", "header", "metadata"])
def test_truncated_missing_or_damaged_data_is_never_served_and_is_recomputed(tmp_path, kind):
    fill(tmp_path)
    (shard,) = shards(tmp_path)
    expected = _damage(shard, kind)
    got = served(tmp_path)  # compares every served value with the teacher
    assert got == expected if kind != "zero-extended" else got >= expected
    fill(tmp_path, sorted(set(range(16)) - got))  # the next run recomputes the rest
    assert served(tmp_path) == set(range(16))


@pytest.mark.parametrize("edit", ["teacher dtype unknown", "teacher dtype quantized", "stored dtype quantized",
                                  "more keys than items", "keys not a list", "fields without a type"])
def test_a_header_edited_with_a_valid_checksum_is_dropped_never_raised(tmp_path, edit):
    """A shard header whose JSON was changed and its CRC written again (so it passes as intact) but whose layout the
    cache never writes: the shard is dropped and the batch recomputed (it raised AttributeError, ValueError or
    TypeError from lookup)."""
    x = torch.arange(8.0).reshape(2, 4)
    cache = TeacherCache(directory=tmp_path)
    cache.bind("fingerprint")
    cache.store([0, 1], {"t": {"a": x * 2, "b": x[:, :1]}}, {}, inputs=((x,), {}))
    cache.close()
    (path,) = shards(tmp_path)
    data = path.read_bytes()
    length = int.from_bytes(data[8:12], "little")
    meta, records = json.loads(data[16:16 + length]), data[teacher_cache_shards.align8(16 + length):]
    layout = meta["layout"]
    if edit == "teacher dtype unknown":
        layout["leaves"][0][1] = "float33"
    elif edit == "teacher dtype quantized":
        layout["leaves"][0][1] = "qint8"
    elif edit == "stored dtype quantized":
        layout["stored"][0] = "qint8"
    elif edit == "more keys than items":
        layout["outputs"]["t"]["map"] = ["a", "b", "c"]
    elif edit == "keys not a list":
        layout["outputs"]["t"]["map"] = 5
    else:
        layout["outputs"]["t"] = {"fields": ["a", "b"], "items": [0, 1]}
    body = json.dumps(meta).encode()
    head = b"LSTCROW2" + len(body).to_bytes(4, "little") + zlib.crc32(body).to_bytes(4, "little") + body
    path.write_bytes(head + bytes(teacher_cache_shards.align8(len(head)) - len(head)) + records)
    cache = TeacherCache(directory=tmp_path)
    cache.bind("fingerprint")
    assert cache.lookup([0, 1], inputs=((x,), {})) is None
    cache.store([0, 1], {"t": {"a": x * 2, "b": x[:, :1]}}, {}, inputs=((x,), {}))
    hit = cache.lookup([0, 1], inputs=((x,), {}))
    assert hit is not None and torch.equal(hit[0]["t"]["a"], x * 2)
    cache.close()


def test_files_of_the_previous_format_are_deleted_never_read(tmp_path):
    (tmp_path / "teacher_cache.json").write_text('{"version": 1, "capacity": "12x"}')
    (tmp_path / "leaf0.bin").write_bytes(bytes(64))
    (tmp_path / "filled.bin").write_bytes(b"\x01" * 16)
    (tmp_path / "notes.txt").write_text("not the cache's")
    assert served(tmp_path) == set()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("tc2-", "."))) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------ the key


@pytest.mark.parametrize("storage", ["memory", "directory"])
def test_a_different_dataset_of_the_same_size_is_recomputed_and_counted(tmp_path, storage):
    teacher, first = worker.make_teacher(), worker.inputs()
    second = torch.randn_like(first)
    cache = TeacherCache(tmp_path if storage == "directory" else None)
    cache.bind("same teacher")
    index = torch.arange(4)
    with torch.no_grad():
        cache.store(index, {"t": teacher(first[index])}, {}, inputs=first[index])
        assert cache.lookup(index, inputs=second[index]) is None
        assert cache.take_stats() == {"hits": 0, "misses": 0, "mismatches": 4}
        cache.store(index, {"t": teacher(second[index])}, {}, inputs=second[index])
        torch.testing.assert_close(cache.lookup(index, inputs=second[index])[0]["t"], teacher(second[index]))
        assert cache.lookup(torch.arange(6), inputs=second[:6]) is None  # two of six not stored
    assert cache.take_stats() == {"hits": 4, "misses": 6, "mismatches": 0}
    assert cache.take_stats() == {"hits": 0, "misses": 0, "mismatches": 0}


TEACHER_SOURCE = """
import torch
from torch import nn


class SourceTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 3)

    def forward(self, x):
        return {body}
"""


def _teacher_from_source(tmp_path, monkeypatch, version: str, body: str):
    folder = tmp_path / version
    folder.mkdir()
    (folder / "source_teacher.py").write_text(TEACHER_SOURCE.format(body=body))
    spec = importlib.util.spec_from_file_location("source_teacher", folder / "source_teacher.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "source_teacher", module)
    spec.loader.exec_module(module)
    teacher = module.SourceTeacher()
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(0.1)  # same weights in every version
    return teacher


class SourceStudent(worker.Student):
    def __init__(self, cache_directory: str, teacher) -> None:
        super().__init__(cache_directory)
        self.__dict__["teacher"] = teacher  # not a submodule

    def configure_teachers(self):
        return {"teacher": self.teacher}

    def configure_feature_hooks(self):
        return {}


def _teachers_outputs(student, index) -> torch.Tensor:
    """``run_teachers`` in a training step of a distilling stage, by hand."""
    student.prepare_teachers()
    student.use_distillation = True
    student.train()
    return student.run_teachers(worker.inputs()[index], sample_index=index)["teacher"]


def test_an_edited_teacher_forward_is_not_served_from_the_cache(tmp_path, monkeypatch):
    index = torch.arange(4)
    old = _teacher_from_source(tmp_path, monkeypatch, "old", "self.layer(x)")
    _teachers_outputs(SourceStudent(str(tmp_path / "cache"), old), index)
    new = _teacher_from_source(tmp_path, monkeypatch, "new", "2 * self.layer(x)")
    with torch.no_grad():
        expected = new(worker.inputs()[index])
    torch.testing.assert_close(_teachers_outputs(SourceStudent(str(tmp_path / "cache"), new), index), expected)
    # a version replaces the source: the same version is the same key, another one is not
    same = teacher_fingerprint({"t": old}, version="1") == teacher_fingerprint({"t": new}, version="1")
    assert same and teacher_fingerprint({"t": old}, version="1") != teacher_fingerprint({"t": old}, version="2")


def test_a_new_version_string_is_a_new_key(tmp_path):
    fill(tmp_path)
    for version, kept in ((None, True), ("2", False)):
        cache = TeacherCache(tmp_path, version=version)
        assert cache.bind("t") is kept
        cache.close()


# ------------------------------------------------------------------------------------------------ precision


def test_float16_storage_refuses_a_value_it_cannot_hold_and_bfloat16_keeps_it(tmp_path):
    big = torch.tensor([[7.0e4, -1.0], [1.0, float("inf")]])
    cache = TeacherCache(tmp_path, dtype=torch.float16)
    cache.bind("t")
    with pytest.raises(DistillationStepError, match=r"`dtype` = 'float16'.*70000.*65504.*bfloat16"):
        cache.store([0, 1], {"t": big}, {})
    assert len(cache) == 0
    cache = TeacherCache(dtype=torch.bfloat16)
    cache.store([0, 1], {"t": big}, {})
    torch.testing.assert_close(cache.lookup([0, 1])[0]["t"], big.bfloat16().float())  # inf is the teacher's own


class LoudStudent(worker.Student):
    """The DDP worker's student, with a teacher whose outputs reach 1e5 and a float16 cache."""

    def configure_teachers(self):
        teacher = worker.make_teacher()
        with torch.no_grad():
            teacher[2].weight.mul_(1e6)
        return {"teacher": teacher}


def test_a_float16_overflow_stops_the_fit_at_the_first_distilling_step(tmp_path):
    model = LoudStudent(str(tmp_path / "unused"))
    model.teacher_cache = TeacherCache(dtype=torch.float16)
    with pytest.raises(DistillationStepError, match="bfloat16"):
        fit(model, [{"name": "distill", "start_epoch": 0, "distillation": True}], epochs=2)
    assert len(model.seen) == 0  # before any loss was computed from a stored value


def fit(model, schedule, epochs):
    labels = torch.randint(0, 3, (worker.N_SAMPLES,), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(IndexedDataset(TensorDataset(worker.inputs(), labels)), batch_size=worker.BATCH_SIZE)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[StageScheduleCallback(stage_schedule=schedule, verbose=False)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(model, loader)


# ------------------------------------------------------------------------------------------------ indices


@pytest.mark.parametrize("storage", ["memory", "directory"])
def test_indices_are_bounded_by_num_samples_and_a_negative_one_is_refused(tmp_path, storage):
    cache = TeacherCache(tmp_path if storage == "directory" else None, num_samples=16)
    cache.bind("t")
    calls = (lambda i: cache.lookup(i), lambda i: cache.store(i, {"t": torch.zeros(len(i), 3)}, {}))
    for call, form in itertools.product(calls, (list, torch.tensor)):  # an int64 tensor: the usual batch's indices
        with pytest.raises(DistillationStepError, match=r"`sample_index` = 1000000000: must be < num_samples = 16"):
            call(form([3, 10**9]))
        with pytest.raises(DistillationStepError, match=r"`sample_index` = -1: must be >= 0"):
            call(form([-1, 2]))
    assert len(cache) == 0
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) < 4096  # no sparse file grew
    with pytest.raises(StageConfigError, match=r"`num_samples` = 0: must be None or a positive integer"):
        TeacherCache(num_samples=0)


# ------------------------------------------------------------------------------------------------ the directory


def test_a_file_as_directory_is_refused_when_the_cache_is_made(tmp_path):
    path = tmp_path / "cache"
    path.write_text("a file")
    with pytest.raises(StageConfigError, match=r"`directory` = '.*cache': is an existing file, not a directory"):
        TeacherCache(path)
    with pytest.raises(StageConfigError, match=r"`directory` = '.*cache/sub': lies under the file"):
        TeacherCache(path / "sub")


def test_a_directory_that_became_a_file_is_refused_with_the_field_named_not_a_raw_error(tmp_path):
    path = tmp_path / "cache"
    model = worker.Student(str(path))
    cache = model.teacher_cache
    cache.check_directory()  # creates it
    path.rmdir()
    path.write_text("a file")
    with pytest.raises(StageConfigError, match=r"`directory`.*is an existing file"):
        cache.check_directory()
    with pytest.raises(StageConfigError, match=r"`directory`.*is an existing file"):
        cache.bind("t")
    with pytest.raises(StageConfigError, match=r"`directory`.*is an existing file"):
        fit(model, [{"name": "distill", "start_epoch": 0, "distillation": True}], epochs=1)
    assert model.seen == [] and model.teacher_calls == 0


# ------------------------------------------------------------------------------------------------ the object


def test_copies_carry_the_configuration_and_no_rows(tmp_path):
    cache = TeacherCache(tmp_path, dtype=torch.bfloat16, num_samples=16, version="3")
    fill(tmp_path)
    cache.bind("t")
    clone = copy.deepcopy(cache)
    assert (clone.directory, clone.dtype, clone.num_samples, clone.version) == (str(tmp_path), torch.bfloat16, 16, "3")
    assert clone.fingerprint is None and len(clone) == 0
