"""Adaptive stages under DDP (2 CPU ranks, gloo, in a subprocess: ``tests/_ddp_adaptive_worker.py``): one plateau
decision for both ranks though each logs a different metric, the same restored weights, the same per-stage data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import _ddp_adaptive_worker as worker
import pytest
import torch
from conftest import ddp_env

WORKER = Path(__file__).with_name("_ddp_adaptive_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``{best_weights: [rank 0's record, rank 1's]}`` of the two runs, and ``"step"``: a step schedule's run (with
    ``best_weights="memory"``), started at once."""
    procs = {}
    for where in ("memory", "file", "step"):
        out = tmp_path_factory.mktemp(where)
        env = ddp_env()
        cmd = [sys.executable, str(WORKER), "--out", str(out), "--best-weights", "file" if where == "file" else "memory",
               "--unit", "step" if where == "step" else "epoch"]
        procs[where] = (out, subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True))
    results = {}
    for where, (out, proc) in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{where} run failed:\n{output[-4000:]}"
        results[where] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return results


def plateau_end(values, patience, cap):
    """EarlyStopping's rule by hand (mode min, no min_delta): the epoch after the stage's last."""
    best, wait = float("inf"), 0
    for epoch in range(cap):
        best, wait = (values[epoch], 0) if values[epoch] < best else (best, wait + 1)
        if wait >= patience:
            return epoch + 1
    return cap


def test_one_plateau_decision_for_both_ranks_from_the_mean_metric(ranks):
    mean = [(a + b) / 2 for a, b in zip(worker.SCRIPTS[0], worker.SCRIPTS[1])]
    end = plateau_end(mean, 1, 4)
    # a rank deciding on its own values would end kd elsewhere, and the two ranks would disagree
    assert (plateau_end(worker.SCRIPTS[0], 1, 4), plateau_end(worker.SCRIPTS[1], 1, 4), end) == (3, 2, 4)
    for where in ("memory", "file"):
        for record in ranks[where]:
            assert record["stage_of"] == {e: "kd" if e < end else "ft" for e in range(5)}
            assert record["transitions"] == {}


@pytest.mark.parametrize("where", ["memory", "file"])
def test_restore_best_gives_equal_weights_on_both_ranks(ranks, where):
    mean = [(a + b) / 2 for a, b in zip(worker.SCRIPTS[0], worker.SCRIPTS[1])]
    best = min(range(4), key=lambda e: mean[e])
    assert best == 2
    rank0, rank1 = ranks[where]
    for key, value in rank0["weights"][f"val{best}"].items():
        assert torch.equal(rank0["weights"]["start4"][key], value), key
        assert torch.equal(rank1["weights"]["start4"][key], value), key
    # the last epoch's weights were not kd's best: the restore changed them
    assert not torch.equal(rank0["weights"]["val3"]["head.weight"], rank0["weights"]["start4"]["head.weight"])


def test_each_stage_trains_on_its_data_on_both_ranks(ranks):
    for record in ranks["memory"]:
        assert record["builds"] == ["all", "labelled"]
        # 16 / 8 samples, split over 2 ranks, 4 per batch
        assert record["batches"] == {e: 2 if e < 4 else 1 for e in range(5)}


def step_plateau_end(values, patience, cap):
    """The same rule over the validations at steps STEP_EVERY, 2 * STEP_EVERY, ... up to ``cap``: the step after the
    stage's last, and the step of its best validation."""
    best, wait, best_step = float("inf"), 0, None
    for step in range(worker.STEP_EVERY, cap + 1, worker.STEP_EVERY):
        value = values[step // worker.STEP_EVERY - 1]
        best, wait, best_step = (value, 0, step) if value < best else (best, wait + 1, best_step)
        if wait >= patience and step < cap:
            return step, best_step
    return cap, best_step


def test_a_step_stage_s_plateau_and_restore_are_the_same_on_both_ranks(ranks):
    """The step schedule: kd ends at the optimizer step after the validation where the mean plateaued (not where
    either rank's own values would end it), and both ranks start ft from the weights of kd's best validation."""
    mean = [(a + b) / 2 for a, b in zip(worker.STEP_SCRIPTS[0], worker.STEP_SCRIPTS[1])]
    end, best_step = step_plateau_end(mean, 1, 10)
    assert (step_plateau_end(worker.STEP_SCRIPTS[0], 1, 10)[0], step_plateau_end(worker.STEP_SCRIPTS[1], 1, 10)[0],
            end, best_step) == (4, 6, 8, 6)
    rank0, rank1 = ranks["step"]
    for record in (rank0, rank1):
        assert record["stage_of"] == {s: "kd" if s < end else "ft" for s in range(worker.MAX_STEPS)}
        assert record["transitions"] == {0: end}
        for key, value in rank0["weights"][f"val{best_step}"].items():
            assert torch.equal(record["weights"][f"step{end}"][key], value), key
    assert not torch.equal(rank0["weights"][f"val{end}"]["head.weight"], rank0["weights"][f"step{end}"]["head.weight"])
