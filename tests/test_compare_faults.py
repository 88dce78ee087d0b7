"""``compare`` when something goes wrong: a metric that is not finite, Ctrl-C, colliding or added configs, a config
that is not YAML, a damaged ``result.json``, a second ``compare`` into the same ``--out``, runs lost to failures."""

from __future__ import annotations

import json
import math
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from lightning_stages.cli import main
from lightning_stages.cli.compare import LOCK_FILE, OutputInUseError, _line, run_compare
from lightning_stages.cli.compare_report import RunOutcome, metric_verdict, write_report
from lightning_stages.cli.run_store import RESULT_FILE, load_result, run_dir, save_result, schedule_names
from lightning_stages.cli.stats import paired_verdict
from lightning_stages.cli.training_run import RunSpec, execute_run
from lightning_stages.errors import StageConfigError, StageProblem

MODEL = """
import os
import signal
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class Fault(pl.LightningModule):
    \"\"\"test/score = bias + 0.01 * seed; the run with seed `nan_seed` logs nan, `interrupt_seed` gets Ctrl-C,
    `exit_seed` calls sys.exit(3), `term_seed` gets SIGTERM.\"\"\"

    def __init__(self, bias: float = 0.0, nan_seed: int = -1, interrupt_seed: int = -1, exit_seed: int = -1,
                 term_seed: int = -1) -> None:
        super().__init__()
        self.bias, self.nan_seed, self.interrupt_seed, self.exit_seed = bias, nan_seed, interrupt_seed, exit_seed
        self.term_seed = term_seed
        self.layer = torch.nn.Linear(2, 1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)

    def test_dataloader(self):
        return self.train_dataloader()

    def training_step(self, batch, batch_idx):
        seed = int(os.environ["PL_GLOBAL_SEED"])
        if seed == self.interrupt_seed:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C in a terminal does to this process
        if seed == self.exit_seed:
            sys.exit(3)
        if seed == self.term_seed:
            signal.raise_signal(signal.SIGTERM)  # what `kill PID` or a job scheduler's time limit does
        return self.layer(batch[0]).sum()

    def test_step(self, batch, batch_idx):
        seed = int(os.environ["PL_GLOBAL_SEED"])
        self.log("test/score", float("nan") if seed == self.nan_seed else self.bias + 0.01 * seed)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
"""
METRICS = ["test/score"]
pytestmark = pytest.mark.filterwarnings("ignore:compare. not like for like")  # the configs differ in bias on purpose


def fault_config(folder: Path, name: str, **init_args: float) -> Path:
    """A config of the tiny ``Fault`` model (its module next to the cwd, where compare imports it from)."""
    (Path.cwd() / "compare_fault_model.py").write_text(MODEL)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    args = ", ".join(f"{k}: {v}" for k, v in init_args.items())
    path.write_text("trainer: {max_epochs: 1, logger: false, enable_checkpointing: false, accelerator: cpu, devices: 1, "
                    "enable_progress_bar: false}\n"
                    f"model: {{class_path: compare_fault_model.Fault, init_args: {{{args}}}}}\n")
    return path


def compare(configs: list[Path], out: Path, seeds: int = 1, **kwargs):
    return run_compare(configs, seeds=seeds, out=out, jobs=1, metrics=METRICS, curve_metric="val/x",
                       echo=lambda line: None, **kwargs)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def score(result, schedule: str, seed: int) -> float:
    return next(r.metrics["test/score"] for r in result.runs[schedule] if r.seed == seed)


# ------------------------------------------------------------------------------------- a metric that is not finite


def test_paired_verdict_leaves_out_values_that_are_not_finite() -> None:
    good = {0: 0.90, 1: 0.80, 2: 0.85, 3: 0.83}
    diverged = {0: math.nan, 1: 0.10, 2: 0.12, 3: math.inf}
    bad = {0: 0.10, 1: 0.20, 2: 0.15, 3: 0.18}
    result = paired_verdict({"diverged": diverged, "good": good, "bad": bad})  # before: AttributeError from stdev

    finite = [1, 2]
    assert [r[:2] for r in result.left_out] == [("diverged", 0), ("diverged", 3)]
    assert math.isnan(result.left_out[0][2]) and result.left_out[1][2] == math.inf
    ranking = {name: (mean, runs) for name, mean, _, runs in result.ranking}
    assert ranking["diverged"] == (pytest.approx(statistics.fmean([0.10, 0.12])), 2)
    assert ranking["good"] == (pytest.approx(statistics.fmean(good.values())), 4)
    against = {c.other: c for c in result.comparisons}
    assert against["diverged"].seeds == 2
    raw = stats.ttest_rel([good[s] for s in finite], [diverged[s] for s in finite]).pvalue
    raw_bad = stats.ttest_rel(list(good.values()), list(bad.values())).pvalue
    assert against["diverged"].p_holm == pytest.approx(max(min(1.0, 2 * min(raw, raw_bad)), raw))  # Holm, 2 tests
    assert "Left out as not finite: diverged seed 0 (nan), diverged seed 3 (inf)." in result.text


def test_a_nan_metric_is_reported_left_out_and_reused_without_a_crash(here: Path) -> None:
    configs = [fault_config(here, "s_a", bias=0.1, nan_seed=1), fault_config(here, "s_b")]
    first = compare(configs, here / "out", seeds=3)  # before: AttributeError after the fourth run, no report
    again = compare(configs, here / "out", seeds=3)  # before: the saved nan was reused, the same crash every time
    assert again.trained == 0 and not again.failed
    assert math.isnan(score(again, "s_a", 1)) and math.isnan(score(first, "s_a", 1))

    verdict = metric_verdict(again.runs, "test/score")
    (comparison,) = verdict.comparisons
    assert verdict.winner == "s_a" and comparison.seeds == 2  # seed 1 left out of the pair a-b
    expected = statistics.fmean(score(again, "s_a", s) - score(again, "s_b", s) for s in (0, 2))
    assert comparison.difference == pytest.approx(expected)
    report = again.report.read_text()
    mean_a = statistics.fmean([score(again, "s_a", 0), score(again, "s_a", 2)])
    assert f"| a | {mean_a:.3f} ± " in report and "(1 nan left out) |" in report
    assert "| a | 1 | nan |" in report
    assert "Left out as not finite: a seed 1 (nan)." in report


# -------------------------------------------------------------------- runs lost to failures: fewer than two pairs


def test_fewer_than_two_paired_seeds_after_failures_name_the_failed_runs_not_one_seed() -> None:
    runs = {"a": [RunOutcome("a", s, metrics={"m": 0.8 + 0.01 * s}) for s in range(3)],
            "b": [RunOutcome("b", 0, metrics={"m": 0.7}),
                  *(RunOutcome("b", s, error="RuntimeError: boom") for s in (1, 2))]}
    text = metric_verdict(runs, "m").text
    # before: "With one seed per schedule ... (run with --seeds 3 or more)" although 3 seeds were run
    assert "one seed per schedule" not in text and "--seeds 3" not in text
    assert text.startswith("Only 1 of the 3 seeds run has a finite result for both a and b (none for b seeds 1, 2")
    one_seed = {"a": [RunOutcome("a", 0, metrics={"m": 0.8})], "b": [RunOutcome("b", 0, metrics={"m": 0.7})]}
    assert metric_verdict(one_seed, "m").text.startswith("With one seed per schedule")


# ------------------------------------------------------------------------------------------------------- Ctrl-C


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, also when the tests run in a background job (which starts
    with SIGINT ignored, so raising it would do nothing)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_in_a_run_of_the_compare_process_stops_the_comparison(here: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    configs = [fault_config(here, "a"), fault_config(here, "b", interrupt_seed=1)]
    out = here / "out"
    handler = signal.getsignal(signal.SIGINT)
    # Lightning turns the KeyboardInterrupt in fit into sys.exit(1); before, that was recorded as the run's
    # failure ("SystemExit: 1") and the comparison went on
    with pytest.raises(KeyboardInterrupt):
        compare(configs, out, seeds=3)
    assert signal.getsignal(signal.SIGINT) == handler, "Lightning left Ctrl-C ignored"
    done = sorted(str(p.relative_to(out)) for p in out.glob(f"runs/*/*/{RESULT_FILE}"))
    assert done == ["runs/a/seed_0/result.json", "runs/a/seed_1/result.json", "runs/b/seed_0/result.json"]
    assert not (out / "runs/a/seed_2").exists(), "no run starts after Ctrl-C"
    assert not (out / "report.md").exists()

    code = main(["compare", *map(str, configs), "--seeds", "3", "--jobs", "1", "--out", str(out), "--metrics",
                 *METRICS, "--curve-metric", "val/x"])
    captured = capsys.readouterr()
    assert code == 130 and f"compare: interrupted; the finished runs are kept in {out}" in captured.err
    assert "[3/6] a seed 1: test/score=0.010" in captured.out and "reused" in captured.out


def test_sys_exit_in_a_run_fails_only_that_run_also_in_the_compare_process(here: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """With --jobs 1 the SystemExit left compare with the model's own exit code: no report, the other runs untrained
    (a worker process or a Ray task recorded it as that run's failure)."""
    config = fault_config(here, "e", exit_seed=0)
    spec = RunSpec("e", 0, str(config), None, str(run_dir(here / "out", "e", 0)), tuple(METRICS))
    assert execute_run(spec).error == "SystemExit: 3"
    assert execute_run(spec, stop_on_sigterm=True).error == "SystemExit: 3"
    out = here / "cli"
    code = main(["compare", str(config), str(fault_config(here, "f", bias=1.0)), "--seeds", "2", "--jobs", "1",
                 "--out", str(out), "--metrics", *METRICS, "--curve-metric", "val/x"])
    assert code == 1 and "e seed 0: FAILED: SystemExit: 3" in capsys.readouterr().out
    assert (out / "report.md").exists() and (out / "runs/f/seed_1" / RESULT_FILE).exists()


@pytest.fixture
def sigterm_survivable():
    """A Python handler for SIGTERM during the test (Lightning calls it with its own while fitting), so that a
    SIGTERM outside a fit could never end the test process."""
    before = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.usefixtures("sigterm_survivable")
def test_sigterm_in_a_run_of_the_compare_process_stops_it_with_143(here: Path, capsys: pytest.CaptureFixture) -> None:
    """Lightning turns SIGTERM into its SIGTERMException (a SystemExit of code None): compare exited 0, as if done."""
    configs = [fault_config(here, "a"), fault_config(here, "b", term_seed=1)]
    out = here / "out"
    code = main(["compare", *map(str, configs), "--seeds", "2", "--jobs", "1", "--out", str(out), "--metrics",
                 *METRICS, "--curve-metric", "val/x"])
    assert code == 143
    assert f"compare: terminated (SIGTERM); the finished runs are kept in {out}" in capsys.readouterr().err
    assert not (out / "report.md").exists() and not (out / "runs/b/seed_1" / RESULT_FILE).exists()
    assert (out / "runs/a/seed_0" / RESULT_FILE).exists()


# ------------------------------------------------------------------------------------------------ schedule names


def test_names_do_not_depend_on_the_order_of_the_configs() -> None:
    # a-x.yaml's own name, and a/x.yaml's told-apart one: whichever came first got "a-x", the other "a-x_2", so a
    # reordered command line took each for the other's changed config, retrained both and overwrote them
    configs = ["a-x.yaml", "a/x.yaml", "b/x.yaml"]
    orders = [configs, configs[::-1], [configs[1], configs[0], configs[2]]]
    named = [dict(zip(order, schedule_names(order))) for order in orders]
    assert named[0] == named[1] == named[2]
    assert named[0]["a-x.yaml"] == "a-x" and len(set(named[0].values())) == 3


def test_names_are_unique_and_do_not_depend_on_the_other_configs() -> None:
    assert schedule_names(["a/x.yaml", "b/x.yaml", "c/x_2.yaml"]) == ["a-x", "b-x", "x_2"]  # before: x, x_2, x_2
    assert schedule_names(["c/x_2.yaml", "b/x.yaml", "a/x.yaml"]) == ["x_2", "b-x", "a-x"]
    assert schedule_names(["p/a/x.yaml", "q/a/x.yaml", "a-x.yaml"])[2] == "a-x"  # folders alike: a hash tells
    assert len(set(schedule_names(["p/a/x.yaml", "q/a/x.yaml", "a-x.yaml"]))) == 3
    twice = schedule_names(["x.yaml", "x.yaml"])  # the same file twice
    assert twice[1] == twice[0] + "_2"
    two = schedule_names(["seg_distill_finetune.yaml", "seg_distill_only.yaml"])
    three = schedule_names(["seg_labels_only.yaml", "seg_distill_finetune.yaml", "seg_distill_only.yaml"])
    assert two == three[1:] == ["seg_distill_finetune", "seg_distill_only"]  # before: distill_finetune, only


def test_configs_with_the_same_file_name_keep_their_own_runs(here: Path) -> None:
    configs = [fault_config(here / "a", "x", bias=0.1), fault_config(here / "b", "x", bias=0.5),
               fault_config(here / "c", "x_2", bias=0.9)]
    result = compare(configs, here / "out")
    assert {name: score(result, name, 0) for name in result.runs} == {
        "a-x": pytest.approx(0.1), "b-x": pytest.approx(0.5), "x_2": pytest.approx(0.9)}
    for name, bias in (("a-x", 0.1), ("b-x", 0.5), ("x_2", 0.9)):
        saved = json.loads((here / "out/runs" / name / "seed_0" / RESULT_FILE).read_text())
        assert saved["schedule"] == name and saved["metrics"]["test/score"] == pytest.approx(bias)


def test_adding_a_config_reuses_the_runs_of_the_others(here: Path) -> None:
    finetune, only = fault_config(here, "seg_distill_finetune", bias=0.1), fault_config(here, "seg_distill_only")
    first = compare([finetune, only], here / "out", seeds=2)
    labels = fault_config(here, "seg_labels_only", bias=0.3)
    second = compare([finetune, only, labels], here / "out", seeds=2)
    assert first.trained == 4 and second.trained == 2  # before: 6, every run renamed
    assert {r.schedule for runs in second.runs.values() for r in runs if not r.reused} == {"seg_labels_only"}
    assert sorted(p.name for p in (here / "out/runs").iterdir()) == sorted(second.runs)
    report = second.report.read_text()  # the report shows the names without their shared prefix
    assert "| labels_only | 0 |" in report and "runs in `runs/seg_labels_only/`" in report


# ----------------------------------------------------------------------------------------- a config that is not YAML


@pytest.mark.parametrize("with_good", [True, False])
def test_a_config_that_is_not_yaml_exits_2_naming_it_before_any_run(here: Path, capsys: pytest.CaptureFixture,
                                                                   with_good: bool) -> None:
    bad = here / "bad.yaml"
    bad.write_text("trainer: {max_epochs: 1\nmodel: [unclosed\n")
    configs = [str(fault_config(here, "good")), str(bad)] if with_good else [str(bad)]
    # before: a traceback (StageConfigError from the like-for-like check, yaml's own error with one config)
    assert main(["compare", *configs, "--out", str(here / "out"), "--jobs", "1", "--metrics", *METRICS]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"compare: {bad}:2:") and "not valid YAML" in err
    assert not (here / "out").exists()


# ---------------------------------------------------------------------------------------- a damaged result.json


DAMAGED = {
    "curves as a list": lambda d: d.update(curves=[]),
    "metrics null": lambda d: d.update(metrics=None),
    "metric as a string": lambda d: d.update(metrics={"test/score": "0.5"}),
    "curve point of one value": lambda d: d.update(curves={"val/x": [[1]]}),
    "boundaries null": lambda d: d.update(boundaries=None),
    "boundary name a number": lambda d: d.update(boundaries=[[0, 1]]),
    "seconds null": lambda d: d.update(seconds=None),
    "another schedule": lambda d: d.update(schedule="zzz"),
    "another seed": lambda d: d.update(seed=7),
    "seed as a string": lambda d: d.update(seed="0"),
    "seed a bool": lambda d: d.update(seed=False),
    "no seed": lambda d: d.pop("seed"),
    "a list": lambda d: d.clear(),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_result_is_not_reused(tmp_path: Path, damage: str) -> None:
    folder = run_dir(tmp_path, "a", 0)
    run = RunOutcome("a", 0, metrics={"test/score": 0.5}, curves={"val/x": [(0, 0.25)]}, boundaries=[(0, "kd")])
    save_result(folder, run, "f1")
    kept = load_result(folder, "f1", METRICS)
    assert kept is not None and (kept.seed, kept.curves, kept.boundaries) == (0, {"val/x": [(0, 0.25)]}, [(0, "kd")])
    data = json.loads((folder / RESULT_FILE).read_text())
    DAMAGED[damage](data)
    (folder / RESULT_FILE).write_text(json.dumps([] if damage == "a list" else data))
    assert load_result(folder, "f1", METRICS) is None  # before: a traceback, or a run with a wrong seed


def test_a_damaged_result_is_trained_again_with_its_own_seed(here: Path) -> None:
    configs = [fault_config(here, "a", bias=0.1), fault_config(here, "b")]
    out = here / "out"
    compare(configs, out, seeds=2)
    path = out / "runs/a/seed_1" / RESULT_FILE
    good = json.loads(path.read_text())
    for damage in ("curves as a list", "another seed", "metrics null"):
        data = json.loads(json.dumps(good))
        DAMAGED[damage](data)
        path.write_text(json.dumps(data))
        result = compare(configs, out, seeds=2)
        assert result.trained == 1, damage
        assert [r.seed for r in result.runs["a"]] == [0, 1]
        assert score(result, "a", 1) == pytest.approx(0.11)
        assert json.loads(path.read_text())["seed"] == 1


# --------------------------------------------------------------------------------- two compares into the same --out

HOLD = """
import sys
from filelock import FileLock
lock = FileLock(sys.argv[1], thread_local=False)
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_compare_into_the_same_out_exits_2_and_a_dead_holder_does_not_block(
        here: Path, capsys: pytest.CaptureFixture) -> None:
    configs = [str(fault_config(here, "a")), str(fault_config(here, "b"))]
    out = here / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK_FILE)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        args = ["compare", *configs, "--seeds", "1", "--jobs", "1", "--out", str(out), "--metrics", *METRICS,
                "--curve-metric", "val/x"]
        assert main(args) == 2
        assert f"compare: another compare is writing into {out}" in capsys.readouterr().err
        assert not (out / "runs").exists()
        with pytest.raises(OutputInUseError):
            compare([Path(c) for c in configs], out)
    finally:
        holder.kill()  # a compare killed in the middle: its OS lock goes with it, its lock file stays
        holder.wait()
    assert (out / LOCK_FILE).exists()
    result = compare([Path(c) for c in configs], out)
    assert result.trained == 2 and not result.failed


# ------------------------------------------------------------------- nothing the user had is lost or overwritten


def test_a_misspelt_metric_fails_the_runs_without_deleting_them_and_the_right_one_reuses_them(here: Path) -> None:
    configs = [fault_config(here, "a", bias=0.1), fault_config(here, "b")]
    out = here / "out"
    first = compare(configs, out)
    assert first.trained == 2 and not first.failed
    result_file = out / "runs/a/seed_0" / RESULT_FILE
    saved = result_file.read_bytes()
    mine = out / "runs/a/seed_0" / "notes.txt"
    mine.write_text("mine")
    typo = run_compare(configs, seeds=1, out=out, jobs=1, metrics=["test/scroe"], curve_metric="val/x",
                       echo=lambda line: None)
    # before: both runs deleted and trained again, then failed ("logged no test/scroe"); the results were gone
    assert typo.trained == 0 and typo.failed
    assert all("the test step logged no test/scroe (logged: " in r.error for runs in typo.runs.values() for r in runs)
    assert result_file.read_bytes() == saved and mine.read_text() == "mine"
    again = compare(configs, out)
    assert again.trained == 0 and not again.failed
    assert score(again, "a", 0) == pytest.approx(score(first, "a", 0))


def test_a_new_run_with_a_misspelt_metric_keeps_what_it_logged_and_the_right_one_reuses_it(here: Path) -> None:
    # before: the run was saved failed with no metrics and no curves, so the right --metrics trained it again
    configs = [fault_config(here, "a", bias=0.1), fault_config(here, "b")]
    out = here / "out"
    typo = run_compare(configs, seeds=1, out=out, jobs=1, metrics=["test/scroe"], curve_metric="val/x",
                       echo=lambda line: None)
    assert typo.trained == 2 and typo.failed
    assert all(r.error.startswith("KeyError: the test step logged no test/scroe (logged: ")
               for runs in typo.runs.values() for r in runs)
    assert all(set(r.metrics) >= set(METRICS) for runs in typo.runs.values() for r in runs)  # kept
    again = compare(configs, out)
    assert again.trained == 0 and not again.failed
    fresh = compare(configs, here / "fresh")
    assert score(again, "a", 0) == score(fresh, "a", 0) and score(again, "b", 0) == score(fresh, "b", 0)


def test_a_report_or_curves_that_compare_did_not_write_are_never_overwritten(here: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    configs = [str(fault_config(here, "a")), str(fault_config(here, "b"))]
    out = here / "mine"
    out.mkdir()
    (out / "report.md").write_text("my report")
    args = ["compare", *configs, "--seeds", "1", "--jobs", "1", "--out", str(out), "--metrics", *METRICS,
            "--curve-metric", "val/x"]
    assert main(args) == 2  # before: trained, then replaced report.md
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "holds report.md that compare did not write" in err
    assert (out / "report.md").read_text() == "my report" and not (out / "runs").exists()
    (out / "report.md").unlink()
    (out / "curves.png").write_bytes(b"mine")
    with pytest.raises(OutputInUseError, match=r"holds curves\.png"):
        compare([Path(c) for c in configs], out)
    (out / "curves.png").unlink()
    assert compare([Path(c) for c in configs], out).trained == 2  # an earlier compare's own files are rewritten
    assert compare([Path(c) for c in configs], out, fresh=True).trained == 2


@pytest.mark.parametrize("option", [["--seeds", "\u00b2"], ["--seeds", "9" * 5000], ["--out", "a_file"],
                                    ["--out", "a_file/under"], ["--launcher", "ray", "--ray-num-cpus", "nan"],
                                    ["--launcher", "ray", "--ray-num-gpus", "nan"]])
def test_bad_compare_options_exit_2_with_one_line_before_anything_runs(here: Path, capsys: pytest.CaptureFixture,
                                                                       option: list[str]) -> None:
    configs = [str(fault_config(here, "a")), str(fault_config(here, "b"))]
    (here / "a_file").write_text("mine")
    args = ["compare", *configs, "--jobs", "1", "--metrics", *METRICS, "--curve-metric", "val/x", "--out", "out"]
    if "--launcher" in option:
        args.remove("--jobs"), args.remove("1")
    assert main([*args, *option]) == 2  # before: a raw ValueError, FileExistsError or NotADirectoryError
    err = capsys.readouterr().err
    assert err.startswith("compare: ") and len(err.strip().splitlines()) == 1
    assert (here / "a_file").read_text() == "mine" and not (here / "out").exists()


def test_a_failed_run_s_line_shows_the_problem_not_only_the_error_s_first_line() -> None:
    error = StageConfigError(StageProblem("must be >= 0", index=1, name="kd\x1b[2J", field="lambda_coef", value=-1))
    run = RunOutcome("a", 0, error=f"StageConfigError: {error}", seconds=1.25)
    line = _line(run, "a", 1, 2, METRICS)
    # before: "FAILED: StageConfigError: 1 problem in the stage schedule:" and nothing of the problem
    assert line == ("[1/2] a seed 0: FAILED: StageConfigError: 1 problem in the stage schedule: - stage 1 "
                    "('kd\\x1b[2J'): `lambda_coef` = -1: must be >= 0  (1.2 s)")


def test_a_schedule_name_with_a_bar_or_a_line_break_stays_one_table_cell(tmp_path: Path) -> None:
    names = ["a|b", "c\nd"]  # config file names may hold both
    runs = {name: [RunOutcome(name, seed, metrics={"test/iou": 0.5 + 0.1 * seed + 0.01 * i}, seconds=1.0)
                   for seed in (0, 1, 2)] for i, name in enumerate(names)}
    report = write_report(runs, {n: tmp_path / f"{n}.yaml" for n in names}, [0, 1, 2], ["test/iou"], {}, [], None,
                          tmp_path, None).read_text()
    assert "| a\\|b | 0.600" in report and "| c\\nd | 0.610" in report
    tables = [t.splitlines() for t in report.split("\n\n") if t.startswith("|")]
    assert len(tables) == 4  # the summary, the verdict, the costs and the runs
    for table in tables:  # every row has as many cells as the separator row (a bar in a name is escaped)
        assert all(line.startswith("|") for line in table)
        assert {len(re.findall(r"(?<!\\)\|", line)) for line in table} == {table[1].count("|")}, table


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_an_out_that_cannot_be_made_a_folder_exits_2_with_one_line(here: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["compare", str(fault_config(here, "a")), "--seeds", "1", "--jobs", "1", "--out", "/proc/no_such",
                 "--metrics", *METRICS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "compare: --out /proc/no_such cannot be made a folder: No such file or directory"


def test_a_file_or_a_link_where_a_run_folder_goes_is_replaced_not_followed(here: Path) -> None:
    """A file there raised FileExistsError out of compare; a link's target (the user's folder) is never emptied."""
    out = here / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "b").write_text("not a schedule's folder")  # NotADirectoryError
    (out / "runs" / "a").mkdir()
    (out / "runs" / "a" / "seed_0").write_text("not a run")
    theirs = here / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    (out / "runs" / "a" / "seed_1").symlink_to(theirs, target_is_directory=True)
    result = compare([fault_config(here, "a"), fault_config(here, "b", bias=1.0)], out, seeds=2)
    assert [r.error for r in result.runs["a"]] == [None, None] and [r.error for r in result.runs["b"]] == [None, None]
    assert (out / "runs/a/seed_0" / RESULT_FILE).is_file() and (out / "runs/a/seed_1" / RESULT_FILE).is_file()
    assert not (out / "runs/a/seed_1").is_symlink() and (theirs / "keep.txt").read_text() == "mine"
