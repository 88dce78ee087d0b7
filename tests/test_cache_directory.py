"""The cache directory as processes and users share it: a key subdirectory that cannot be made during a run, probes
of processes with one pid, a team directory under the default umask; and teacher outputs that are views (conjugate)
or have no rows of bytes (sparse)."""

from __future__ import annotations

import os
import stat
import warnings

import pytest
import torch

from lightning_stages import StageConfigError, TeacherCache
from lightning_stages.distillation.teacher_cache_storage import directory_problem
from lightning_stages.errors import DistillationStepError


def _block_the_directory_lock(directory) -> None:
    """Make the directory's lock file unusable (a directory in its place): opening a key fails, even for root."""
    lock = os.path.join(directory, ".teacher_cache.lock")
    if os.path.exists(lock):
        os.remove(lock)
    os.mkdir(lock)


def test_a_key_that_cannot_be_opened_during_the_run_warns_and_the_teachers_run(tmp_path):
    x = torch.arange(6.0).reshape(2, 3)
    cache = TeacherCache(tmp_path)
    cache.bind("teacher as at the start")
    cache.store([0, 1], {"t": 2 * x}, {}, inputs=x)
    _block_the_directory_lock(tmp_path)
    with pytest.warns(UserWarning, match="cannot use .* for the teachers as they are now .*training goes on"):
        assert cache.bind("teacher updated in place") is False  # no error: the fit goes on
    assert cache.lookup([0, 1], inputs=x) is None  # nothing served: the teachers run
    cache.store([0, 1], {"t": 3 * x}, {}, inputs=x)  # dropped, no error
    assert cache.lookup([0, 1], inputs=x) is None and len(cache) == 0
    os.rmdir(tmp_path / ".teacher_cache.lock")  # usable again: the next key is stored and read
    cache.bind("teacher updated again")
    cache.store([0, 1], {"t": 4 * x}, {}, inputs=x)
    outputs, _ = cache.lookup([1, 0], inputs=x.flip(0))
    assert torch.equal(outputs["t"], 4 * x.flip(0))


def test_a_directory_that_cannot_be_opened_at_its_first_use_is_an_error(tmp_path):
    _block_the_directory_lock(tmp_path)
    with pytest.raises(StageConfigError, match=r"`directory` = .*: cannot be used"):
        TeacherCache(tmp_path).bind("teacher")


def test_the_write_probe_is_a_file_of_its_own_not_one_per_pid(tmp_path):
    # another process of the same pid (another container, another node) probing at the same time: its probe file
    os.mkdir(tmp_path / f".write-probe-{os.getpid()}")
    assert directory_problem(str(tmp_path), create=True) is None
    assert os.listdir(tmp_path) == [f".write-probe-{os.getpid()}"]  # the probe cleaned up after itself


@pytest.mark.parametrize(("mode", "shared"), [(0o2775, stat.S_IWGRP), (0o755, 0)])
def test_the_lock_file_and_key_directory_are_as_writable_as_the_directory_whatever_the_umask(tmp_path, mode, shared):
    directory = tmp_path / "team"
    directory.mkdir()
    directory.chmod(mode)
    umask = os.umask(0o022)
    try:
        TeacherCache(directory).bind("teacher")
    finally:
        os.umask(umask)
    lock = (directory / ".teacher_cache.lock").stat().st_mode
    (key,) = [p for p in directory.iterdir() if p.name.startswith("tc2-")]
    assert lock & (stat.S_IWGRP | stat.S_IWOTH) == shared
    assert key.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH) == shared


@pytest.mark.parametrize("directory", [False, True])
def test_a_conjugate_view_output_is_stored_as_its_values(tmp_path, directory):
    x = torch.randn(4, 3)
    output = torch.fft.rfft(x).conj()  # a conjugate view: its memory is not its values
    cache = TeacherCache(tmp_path if directory else None)
    cache.bind("teacher")
    cache.store([0, 1, 2, 3], {"t": output}, {}, inputs=x)
    outputs, _ = cache.lookup([2, 0], inputs=x[[2, 0]])
    expected = torch.fft.rfft(x[[2, 0]]).conj().resolve_conj()
    assert torch.equal(outputs["t"], expected) and not outputs["t"].is_conj()


def test_a_sparse_teacher_output_is_refused_naming_it():
    x = torch.randn(2, 3)
    cache = TeacherCache()
    cache.bind("teacher")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's beta warning for sparse tensors
        sparse = torch.eye(2, 3).to_sparse()
    with pytest.raises(DistillationStepError, match=r"`output of teacher 't'` = 'sparse_coo': is a sparse_coo tensor, "
                                                    r"which the cache cannot store; make it dense"):
        cache.store([0, 1], {"t": sparse}, {}, inputs=x)


def test_a_lock_file_made_before_without_the_shared_bits_gets_them(tmp_path):
    directory = tmp_path / "team"
    directory.mkdir()
    directory.chmod(0o2775)
    lock = directory / ".teacher_cache.lock"
    lock.write_text("")
    lock.chmod(0o644)  # as an earlier version, or a run before the directory was shared, made it
    TeacherCache(directory).bind("teacher")
    assert lock.stat().st_mode & stat.S_IWGRP
