"""``compare`` runs: parallel jobs, one folder per run, resuming, config changes, ``--fresh``, ``--seeds auto``, costs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import compare_config as tiny_config
from conftest import ddp_env, make_tiny_teacher
from scipy import stats

from lightning_stages.cli import main
from lightning_stages.cli.compare import run_compare
from lightning_stages.cli.compare_report import RunOutcome
from lightning_stages.cli.launchers import LocalLauncher, available_cores
from lightning_stages.cli.run_store import RESULT_FILE
from lightning_stages.cli.training_run import RunSpec
from lightning_stages.cli.worker_pool import WorkerPool

KD_THEN_FT = [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True, "lambda_coef": 1.0},
              {"name": "ft", "start_epoch": 1, "distillation": False}]
BATCHES_PER_EPOCH = 2  # 16 training images in batches of 8


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("configs")
    teacher = make_tiny_teacher(folder / "teacher.ckpt")
    return [tiny_config(folder / "s_kd_ft.yaml", teacher, KD_THEN_FT), tiny_config(folder / "s_labels.yaml", teacher)]


def quiet(line: str) -> None:
    pass


def per_run(result) -> dict[tuple[str, int], dict[str, float]]:
    return {(r.schedule, r.seed): r.metrics for runs in result.runs.values() for r in runs}


def result_files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob(f"runs/*/*/{RESULT_FILE}"))}


def test_two_jobs_give_the_same_runs_as_one_and_the_costs_per_stage(configs: list[Path], tmp_path: Path) -> None:
    one = run_compare(configs, seeds=[1], out=tmp_path / "one", jobs=1, echo=quiet)
    two = run_compare(configs, seeds=[1], out=tmp_path / "two", jobs=2, echo=quiet)  # a worker process per run
    assert not one.failed and not two.failed
    assert set(per_run(one)) == {("s_kd_ft", 1), ("s_labels", 1)}  # named after the files; the report shows kd_ft
    assert per_run(two) == per_run(one)
    for name in ("s_kd_ft", "s_labels"):
        assert [r.curves for r in two.runs[name]] == [r.curves for r in one.runs[name]]

    for run in one.runs["s_kd_ft"]:  # the teacher runs in the distilling epoch only
        assert (run.teacher_forwards, run.teacher_samples) == (BATCHES_PER_EPOCH, 16)
        assert run.distill_seconds > 0 and run.other_seconds > 0
    for run in one.runs["s_labels"]:
        assert (run.teacher_forwards, run.distill_seconds) == (0, 0.0) and run.other_seconds > 0
    report = one.report.read_text()
    cost = next(line for line in report.splitlines() if line.startswith("| kd_ft |") and line.endswith("| 16 |"))
    assert f"| {BATCHES_PER_EPOCH} | 16 |" in cost
    assert "paired t-test on the per-seed differences" in report


def test_a_killed_comparison_resumes_with_only_the_missing_runs(configs: list[Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "123")  # a later DistributedSampler reads it: runs must not leak theirs
    out, lines = tmp_path / "out", []

    def stop_after_three(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            raise KeyboardInterrupt  # killed after three finished runs, before the fourth started

    with pytest.raises(KeyboardInterrupt):
        run_compare(configs, seeds=2, out=out, jobs=1, echo=stop_after_three)
    kept = result_files(out)
    assert len(kept) == 3 and not (out / "report.md").exists()
    missing = "runs/s_labels/seed_1/result.json"  # seed-major order: the fourth run
    assert missing not in kept
    stray = out / Path(missing).parent / "events.out.tfevents.killed"  # what a run killed in flight leaves
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text("half a run")

    resumed = run_compare(configs, seeds=2, out=out, jobs=1, echo=quiet)
    assert resumed.trained == 1
    assert [(r.schedule, r.seed) for runs in resumed.runs.values() for r in runs if not r.reused] == [("s_labels", 1)]
    assert {k: v for k, v in result_files(out).items() if k != missing} == kept  # untouched
    assert not stray.exists(), "a rerun run starts from an empty folder"
    report = (out / "report.md").read_text()
    assert report.count("| ok (reused) |") == 3 and "3 of 4 runs reused" in report
    assert os.environ["PL_GLOBAL_SEED"] == "123"


def test_a_changed_config_reruns_its_schedule_and_fresh_reruns_all(configs: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    kd_ft, labels = (Path(shutil.copy(c, folder / c.name)) for c in configs)
    for config in (kd_ft, labels):  # checkpoints on: a rerun must not find the earlier run's checkpoints
        config.write_text(config.read_text().replace("enable_checkpointing: false", "enable_checkpointing: true"))
    out = tmp_path / "out"
    first = run_compare([kd_ft, labels], seeds=1, out=out, jobs=1, echo=quiet)
    assert first.trained == 2
    before = result_files(out)

    labels.write_text(labels.read_text().replace("lr: 0.003", "lr: 0.01"))
    changed = run_compare([kd_ft, labels], seeds=1, out=out, jobs=1, echo=quiet)
    assert changed.trained == 1
    assert {r.schedule for runs in changed.runs.values() for r in runs if not r.reused} == {"s_labels"}
    after = result_files(out)
    assert all(after[k] == v for k, v in before.items() if "/s_kd_ft/" in k)
    assert all(after[k] != v for k, v in before.items() if "/s_labels/" in k)
    saved = json.loads((out / "runs/s_labels/seed_0/result.json").read_text())
    assert saved["metrics"]["test/iou"] == changed.runs["s_labels"][0].metrics["test/iou"]

    again = run_compare([kd_ft, labels], seeds=1, out=out, jobs=1, echo=quiet)
    assert again.trained == 0 and per_run(again) == per_run(changed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["compare", str(kd_ft), str(labels), "--seeds", "1", "--out", str(out), "--jobs", "1",
                     "--fresh"]) == 0
    assert all(result_files(out)[k] != v for k, v in after.items())
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert len(list(out.glob("runs/s_labels/seed_0/**/*.ckpt"))) == 1


GAPS = [0.05, -0.04, 0.06, 0.05, 0.055, 0.045, 0.05, 0.05]  # schedule a minus b, per seed


class ScoresLauncher:
    """Stands in for the training engine: each run's test IoU is fixed by its schedule and seed."""

    def __init__(self, jobs: int) -> None:
        self.seeds_run: list[int] = []

    def __enter__(self) -> ScoresLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, specs):
        for spec in specs:
            self.seeds_run.append(spec.seed)
            base = 0.6 + 0.1 * (spec.seed % 3)  # seed-to-seed spread that pairing removes
            value = base + (GAPS[spec.seed] if spec.schedule == "s_a" else 0.0)
            yield RunOutcome(spec.schedule, spec.seed, metrics={"test/iou": value})


def test_seeds_auto_stops_at_the_first_round_whose_paired_test_decides(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_stages.cli.compare.LocalLauncher", ScoresLauncher)
    configs = [tiny_config(tmp_path / "s_a.yaml", None), tiny_config(tmp_path / "s_b.yaml", None)]
    expected = next(n for n in range(3, len(GAPS) + 1)
                    if stats.ttest_1samp(GAPS[:n], 0.0).pvalue < 0.05 and sum(GAPS[:n]) > 0)
    assert expected > 3  # the first round alone does not decide

    result = run_compare(configs, seeds="auto", max_seeds=len(GAPS), out=tmp_path / "out", metrics=["test/iou"],
                         echo=quiet)
    assert result.decided and result.seeds == list(range(expected))
    assert f"it stopped at {expected} seeds because the verdict on test/iou was decided" in result.report.read_text()
    assert "**a** is best on test IoU" in result.report.read_text()


def test_seeds_auto_adds_rounds_until_max_seeds_when_undecided(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_stages.cli.compare.LocalLauncher", ScoresLauncher)
    configs = [tiny_config(tmp_path / "s_b.yaml", None), tiny_config(tmp_path / "s_twin.yaml", None)]
    # b and twin score the same on every seed: every paired difference is 0, never decided
    result = run_compare(configs, seeds="auto", max_seeds=5, out=tmp_path / "out", echo=quiet)
    assert result.seeds == [0, 1, 2, 3, 4] and not result.decided
    assert [r.seed for r in result.runs["s_twin"]] == [0, 1, 2, 3, 4]
    assert "`--seeds auto` started with 3 and added one seed per round; it stopped at 5 seeds, the --max-seeds " \
           "limit (5), without a decision on test/iou" in result.report.read_text()


PROBE = """
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class Probe(pl.LightningModule):
    \"\"\"Logs the torch threads and the process it trained in; the run with seed `crash_seed` kills its process.\"\"\"

    def __init__(self, crash_seed: int = -1, loader_workers: int = 0) -> None:
        super().__init__()
        self.crash_seed, self.loader_workers = crash_seed, loader_workers
        self.layer = torch.nn.Linear(2, 1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2, num_workers=self.loader_workers)

    def test_dataloader(self):
        return self.train_dataloader()

    def training_step(self, batch, batch_idx):
        if int(os.environ["PL_GLOBAL_SEED"]) == self.crash_seed:
            os._exit(3)  # what a segfault or the out-of-memory killer does to the process
        return self.layer(batch[0]).sum()

    def test_step(self, batch, batch_idx):
        self.log_dict({"test/threads": float(torch.get_num_threads()),
                       "test/interop": float(torch.get_num_interop_threads()), "test/pid": float(os.getpid())})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
"""
PROBE_METRICS = ("test/threads", "test/interop", "test/pid")


def probe_config(folder: Path, name: str, crash_seed: int = -1, loader_workers: int = 0) -> Path:
    (folder / "compare_probe_model.py").write_text(PROBE)
    path = folder / f"{name}.yaml"
    path.write_text(f"trainer: {{max_epochs: 1, logger: false, enable_checkpointing: false, accelerator: cpu, "
                    f"devices: 1, enable_progress_bar: false}}\n"
                    f"model: {{class_path: compare_probe_model.Probe, init_args: {{crash_seed: {crash_seed}, "
                    f"loader_workers: {loader_workers}}}}}\n")
    return path


def test_workers_start_once_take_runs_in_turn_and_a_dead_worker_fails_only_its_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the workers import the probe's module from their working directory
    # "ok" loads its data in a DataLoader worker process: a run may start processes of its own
    ok, crash = probe_config(tmp_path, "ok", loader_workers=1), probe_config(tmp_path, "crash", crash_seed=1)
    specs = [RunSpec(config.stem, seed, str(config), None, str(tmp_path / "runs" / config.stem / f"seed_{seed}"),
                     PROBE_METRICS) for seed in range(3) for config in (ok, crash)]
    with WorkerPool(workers=2, threads=1) as pool:
        outcomes = {(o.schedule, o.seed): o for o in pool.run(specs)}
        started = pool.started
        workers = set(pool.pids)
        interrupted = pool.run([specs[0], specs[2]])  # two runs of "ok"; the comparison stops after the first
        first = next(interrupted)
        interrupted.close()
        left = pool.pids
    assert first.error is None and left == [int(first.metrics["test/pid"])]  # the free worker is kept
    (in_flight,) = workers - set(left)
    with pytest.raises(ProcessLookupError):  # the worker of the run in flight was stopped (and reaped)
        os.kill(in_flight, 0)
    assert set(outcomes) == {(s.schedule, s.seed) for s in specs}
    died = outcomes.pop(("crash", 1))
    assert died.error == "WorkerDied: the worker process training this run died (exit code 3)"
    assert all(o.error is None for o in outcomes.values()), [o.error for o in outcomes.values()]
    assert started == 3  # two workers, and one in place of the dead one
    pids = {o.metrics["test/pid"] for o in outcomes.values()}
    assert len(pids) <= started < len(outcomes) and os.getpid() not in pids  # each worker trained several runs
    assert {(o.metrics["test/threads"], o.metrics["test/interop"]) for o in outcomes.values()} == {(1.0, 1.0)}


def test_each_job_gets_its_share_of_the_cores_and_one_job_trains_in_this_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = probe_config(tmp_path, "ok")
    spec = RunSpec("ok", 0, str(config), None, str(tmp_path / "runs" / "ok" / "seed_0"), PROBE_METRICS)
    assert LocalLauncher(jobs=2).threads == max(1, available_cores() // 2)
    with LocalLauncher(jobs=1) as launcher:
        (outcome,) = launcher.run([spec])
    assert outcome.error is None, outcome.error
    assert outcome.metrics["test/pid"] == os.getpid()
    assert outcome.metrics["test/threads"] == available_cores()


LEFT_OPEN = """
from lightning_stages.cli.training_run import RunSpec
from lightning_stages.cli.worker_pool import WorkerPool

if __name__ == "__main__":
    pool = WorkerPool(workers=1, threads=1)
    (outcome,) = pool.run([RunSpec("ok", 0, "ok.yaml", None, "runs/ok/seed_0", ("test/pid",))])
    print(outcome.error, pool.pids[0], flush=True)
"""


def test_a_pool_never_closed_does_not_keep_python_from_exiting(tmp_path: Path) -> None:
    probe_config(tmp_path, "ok")
    (tmp_path / "left_open.py").write_text(LEFT_OPEN)
    done = subprocess.run([sys.executable, "left_open.py"], cwd=tmp_path, env=ddp_env(), capture_output=True,
                          text=True, timeout=120)  # before: the interpreter joined the idle worker forever
    assert done.returncode == 0, done.stderr[-2000:]
    error, pid = done.stdout.split()
    assert error == "None"
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)
