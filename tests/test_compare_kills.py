"""``compare`` killed outright, and a finished comparison run again after what it depends on changed: no worker
outlives a killed ``compare``, no stale run is reused, no report is left half written."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from conftest import ddp_env, save_earlier_result

from lightning_stages.cli.compare import run_compare
from lightning_stages.cli.run_store import RESULT_FILE

BLOCKING = """
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class Blocking(pl.LightningModule):
    \"\"\"test/score = bias + 0.01 * seed. With BLOCK_STARTED and BLOCK_GATE (FIFOs), the training step writes its
    process id into the first and then waits for the second forever (nobody writes it).\"\"\"

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.bias = bias
        self.layer = torch.nn.Linear(2, 1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)

    def test_dataloader(self):
        return self.train_dataloader()

    def training_step(self, batch, batch_idx):
        if os.environ.get("BLOCK_GATE"):
            with open(os.environ["BLOCK_STARTED"], "w") as started:
                started.write(f"{os.getpid()}\\n")
            with open(os.environ["BLOCK_GATE"]) as gate:
                gate.read()
        return self.layer(batch[0]).sum()

    def test_step(self, batch, batch_idx):
        self.log("test/score", self.bias + 0.01 * int(os.environ["PL_GLOBAL_SEED"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
"""
METRICS = ["test/score"]
pytestmark = pytest.mark.filterwarnings("ignore:compare. not like for like")


def blocking_config(folder: Path, name: str, bias: float = 0.0) -> Path:
    (folder / "compare_blocking_model.py").write_text(BLOCKING)
    path = folder / f"{name}.yaml"
    path.write_text("trainer: {max_epochs: 1, logger: false, enable_checkpointing: false, accelerator: cpu, devices: 1, "
                    "enable_progress_bar: false}\n"
                    f"model: {{class_path: compare_blocking_model.Blocking, init_args: {{bias: {bias}}}}}\n")
    return path


def compare(configs: list[Path], out: Path, **kwargs):
    return run_compare(configs, seeds=1, out=out, jobs=1, metrics=METRICS, curve_metric="val/x",
                       echo=lambda line: None, **kwargs)


def _ended(pid: int, timeout: float) -> bool:
    """Whether the process (not a child of ours) ends within ``timeout`` seconds (a bound on a hang, not a timing)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux)")
def test_workers_end_with_a_killed_compare_and_its_lock_does_not_block(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    configs = [blocking_config(tmp_path, "a")]  # one run: one worker (the pool starts them as needed)
    started, gate = tmp_path / "started", tmp_path / "gate"
    os.mkfifo(started)
    os.mkfifo(gate)
    env = {**ddp_env(), "BLOCK_STARTED": str(started), "BLOCK_GATE": str(gate)}
    args = ["compare", *map(str, configs), "--seeds", "1", "--jobs", "2", "--out", "out", "--metrics", *METRICS,
            "--curve-metric", "val/x"]
    parent = subprocess.Popen([sys.executable, "-c", f"from lightning_stages.cli import main; main({args!r})"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []

    def read_pids() -> None:
        while not pids:  # the worker is in a training step
            with started.open() as lines:
                pids.extend(int(line) for line in lines)

    try:
        reader = threading.Thread(target=read_pids, daemon=True)
        reader.start()
        reader.join(300)  # a bound on a hang (compare failed before any worker trained), not a timing
        if not pids:
            with contextlib.suppress(OSError):  # let the reader's open return
                os.close(os.open(started, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"no worker started a training step; compare exited with {parent.poll()}")
        parent.kill()  # SIGKILL: no finally, no atexit in compare
        parent.wait()
        alive = [pid for pid in pids if not _ended(pid, 60)]
        # before: the worker went on (here: waited forever); a real run would have gone on writing into
        # runs/a/seed_0 while the next compare trained the same run there
        assert not alive, f"worker {alive} outlived the killed compare"
    finally:
        parent.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not list((tmp_path / "out").glob("runs/*/*/result.json"))
    result = compare(configs, tmp_path / "out")  # the lock of the killed compare does not block
    assert result.trained == 1 and not result.failed


# ------------------------------------------------------------------ a nested config or a file it names, changed


def test_a_changed_nested_config_or_a_file_it_names_reruns_the_schedule(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocking_config(tmp_path, "unused")
    folder = tmp_path / "configs"  # not the working directory: LightningCLI reads model.yaml from the config's folder
    folder.mkdir()
    config = folder / "a.yaml"
    config.write_text("trainer: {max_epochs: 1, logger: false, enable_checkpointing: false, accelerator: cpu, "
                      "devices: 1, enable_progress_bar: false}\nmodel: model.yaml\n")
    nested = folder / "model.yaml"
    nested.write_text("class_path: compare_blocking_model.Blocking\ninit_args: {bias: 0.1}\n")
    first = compare([config], tmp_path / "out")
    assert first.trained == 1 and first.runs["a"][0].metrics["test/score"] == pytest.approx(0.1)

    nested.write_text("class_path: compare_blocking_model.Blocking\ninit_args: {bias: 0.5}\n")
    second = compare([config], tmp_path / "out")
    # before: reused, test/score 0.1 for a model trained with bias 0.5
    assert second.trained == 1 and second.runs["a"][0].metrics["test/score"] == pytest.approx(0.5)
    assert compare([config], tmp_path / "out").trained == 0


def test_the_fingerprint_follows_nested_configs_and_the_files_they_name(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stages.cli.run_store import config_fingerprint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "parts").mkdir(parents=True)
    config = tmp_path / "configs" / "a.yaml"
    config.write_text("model: parts/model.yaml\n")
    nested = tmp_path / "configs" / "parts" / "model.yaml"
    nested.write_text("init_args: {teacher_checkpoint: teacher.ckpt}\n")
    teacher = tmp_path / "configs" / "parts" / "teacher.ckpt"
    teacher.write_bytes(b"teacher 1")
    before = config_fingerprint(config)
    config.write_text("model: parts/model.yaml  # a comment\n")
    assert config_fingerprint(config) == before
    teacher.write_bytes(b"teacher 2")  # named by the nested config, relative to its folder
    after_teacher = config_fingerprint(config)
    assert after_teacher != before
    nested.write_text("init_args: {teacher_checkpoint: teacher.ckpt, lr: 0.1}\n")
    assert config_fingerprint(config) not in (before, after_teacher)
    nested.write_text(f"init_args: {{teacher_checkpoint: {config.name}}}\n")  # names the config: no endless loop
    config.write_text(f"model: parts/model.yaml\nagain: {config}\n")
    assert config_fingerprint(config) == config_fingerprint(config)


def test_a_named_yaml_that_refers_to_itself_or_nests_deeply_counts_by_its_bytes(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stages.cli.run_store import config_fingerprint

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "a.yaml"
    config.write_text("model: model.yaml\ndata: {init_args: {index: index.json}}\n")
    (tmp_path / "model.yaml").write_text("a: &a [*a]\n")  # a YAML alias inside its own anchor
    (tmp_path / "index.json").write_text("[" * 5000 + "]" * 5000)  # valid JSON, nested deeper than the stack
    # before: RecursionError, a traceback out of compare
    before = config_fingerprint(config)
    (tmp_path / "model.yaml").write_text("a: &a [*a, 1]\n")
    assert config_fingerprint(config) != before


def test_each_file_a_config_names_is_read_once_per_compare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stages.cli import run_fingerprint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.ckpt").write_bytes(b"a big teacher")
    configs = [blocking_config(tmp_path, "a", 0.1), blocking_config(tmp_path, "b")]
    configs[0].write_text(configs[0].read_text() + "teacher: teacher.ckpt\n")
    reads: list[str] = []
    digest = run_fingerprint._file_digest
    monkeypatch.setattr(run_fingerprint, "_file_digest", lambda path: reads.append(path.name) or digest(path))
    compare(configs, tmp_path / "out")
    # before: twice (the fingerprint with the model's code, then without): a checkpoint of gigabytes read twice
    assert reads == ["teacher.ckpt"]


def test_a_model_named_by_a_class_path_string_counts_its_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    configs = [blocking_config(tmp_path, "a"), blocking_config(tmp_path, "b", 0.1)]
    # LightningCLI takes the class path as the value itself (no class_path key, no init_args)
    configs[0].write_text(configs[0].read_text().split("model:")[0] + "model: compare_blocking_model.Blocking\n")
    monkeypatch.delitem(sys.modules, "compare_blocking_model", raising=False)
    assert compare(configs, tmp_path / "out").trained == 2
    module = tmp_path / "compare_blocking_model.py"
    module.write_text(module.read_text().replace("self.bias + 0.01 *", "5 + self.bias + 0.01 *"))
    monkeypatch.delitem(sys.modules, "compare_blocking_model")
    again = compare(configs, tmp_path / "out")
    # before: a reused with test/score 0.0, from the model as it was
    assert again.trained == 2 and again.runs["a"][0].metrics["test/score"] == pytest.approx(5.0)


def test_a_model_module_linked_into_the_working_directory_counts(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stages.cli.run_fingerprint import source_digests

    (tmp_path / "shared").mkdir()
    (tmp_path / "project").mkdir()
    (tmp_path / "shared" / "linked_model_module.py").write_text("class Net: pass\n")
    (tmp_path / "project" / "linked_model_module.py").symlink_to(tmp_path / "shared" / "linked_model_module.py")
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.syspath_prepend(str(tmp_path / "project"))
    # before: {} (the module's real path is outside the working directory): editing it reused the stale runs
    assert list(source_digests([{"model": {"class_path": "linked_model_module.Net"}}])) == ["linked_model_module"]


def test_a_config_with_int_and_str_keys_in_one_mapping_has_a_fingerprint(tmp_path: Path) -> None:
    from lightning_stages.cli.run_store import config_fingerprint

    config = tmp_path / "a.yaml"
    config.write_text("model: {init_args: {class_weights: {0: 1.0, background: 0.5}}}\n")
    # before: TypeError ('<' between str and int, sorting the keys): a traceback out of compare
    before = config_fingerprint(config)
    assert before == config_fingerprint(config)
    config.write_text("model: {init_args: {class_weights: {0: 1.0, background: 0.7}}}\n")
    assert config_fingerprint(config) != before


def test_an_interrupted_rerun_of_a_changed_config_keeps_the_finished_result(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    configs = [blocking_config(tmp_path, "a", 0.1), blocking_config(tmp_path, "b")]
    out = tmp_path / "out"
    monkeypatch.delitem(sys.modules, "compare_blocking_model", raising=False)
    assert compare(configs, out).trained == 2
    result = out / "runs" / "a" / "seed_0" / RESULT_FILE
    kept = result.read_bytes()
    blocking_config(tmp_path, "a", 0.3)  # changed: a's finished run is stale, the warning says so
    module = tmp_path / "compare_blocking_model.py"
    module.write_text(module.read_text().replace("        return self.layer(batch[0]).sum()",
                                                 "        raise KeyboardInterrupt  # Ctrl-C in the rerun"))
    monkeypatch.delitem(sys.modules, "compare_blocking_model")
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compare(configs, out)
    # before: gone (the rerun had emptied the folder), though the warning said "kept where the new run fails"
    assert result.read_bytes() == kept


def test_a_yaml_set_in_a_config_gives_the_same_fingerprint_in_every_process(tmp_path: Path) -> None:
    config = tmp_path / "a.yaml"
    config.write_text("model: {init_args: {tags: !!set {alpha, beta, gamma, delta, epsilon}}}\n")
    code = f"from lightning_stages.cli.run_store import config_fingerprint; print(config_fingerprint({str(config)!r}))"
    prints = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                             capture_output=True, text=True, check=True).stdout for seed in range(4)}
    # before: str() of the set, in the order of that process's string hashes: every compare retrained the runs
    assert len(prints) == 1


# ------------------------------------------------------------------------------------ the report, written whole


def test_a_report_write_killed_midway_leaves_the_earlier_report_whole(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    configs = [blocking_config(tmp_path, "a", 0.1), blocking_config(tmp_path, "b")]
    out = tmp_path / "out"
    compare(configs, out)
    earlier = (out / "report.md").read_text()
    write_text = Path.write_text

    def killed_midway(self: Path, data: str, *args, **kwargs) -> int:
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # the process is stopped in the middle of the write

    monkeypatch.setattr(Path, "write_text", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        compare(configs, out)
    monkeypatch.undo()
    # before: report.md held the first half of the new report, as if complete
    assert (out / "report.md").read_text() == earlier
    assert sorted(p.name for p in out.iterdir()) == [".compare.lock", "curves.png", "report.md", "runs"]


def test_a_config_whose_file_name_is_not_utf8_is_trained_and_reported(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from lightning_stages.cli import main

    monkeypatch.chdir(tmp_path)
    good = blocking_config(tmp_path, "a", 0.1)
    latin1 = tmp_path / os.fsdecode(b"caf\xe9.yaml")  # a Latin-1 file name on a UTF-8 system
    latin1.write_text(good.read_text())
    args = ["compare", str(good), str(latin1), "--seeds", "1", "--jobs", "1", "--out", "out", "--metrics", *METRICS,
            "--curve-metric", "val/x"]
    # before: the run failed (Lightning's logger refused its folder name), then a UnicodeEncodeError traceback
    # left report.md empty
    assert main(args) == 0
    assert "[2/2] caf\\xe9 seed 0: test/score=0.100" in capsys.readouterr().out
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| caf\\xe9 | 0 | 0.1000 |" in report
    assert (tmp_path / "out" / "runs" / "caf\\xe9" / "seed_0" / "result.json").is_file()


def test_finished_runs_replaced_because_their_config_changed_are_named_first(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    configs = [blocking_config(tmp_path, "a", 0.1), blocking_config(tmp_path, "b")]
    out = tmp_path / "out"
    run_compare(configs, seeds=2, out=out, jobs=1, metrics=METRICS, curve_metric="val/x", echo=lambda line: None)
    blocking_config(tmp_path, "a", 0.3)
    with pytest.warns(UserWarning) as caught:
        again = run_compare(configs, seeds=2, out=out, jobs=1, metrics=METRICS, curve_metric="val/x",
                            echo=lambda line: None)
    assert again.trained == 2
    replaced = [str(w.message) for w in caught if "changed since" in str(w.message)]
    # before: the two finished runs of a were replaced without a word
    assert replaced == [f"compare: a: the config, a file it names or its model's code changed since seeds 0, 1 "
                        f"were trained into {out}; training them again replaces the earlier results (kept where the "
                        "new run fails)"]


def test_an_edited_model_module_reruns_its_schedule_and_older_results_are_still_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stages.cli.run_store import config_fingerprint

    monkeypatch.chdir(tmp_path)
    configs = [blocking_config(tmp_path, "a", 0.1), blocking_config(tmp_path, "b")]
    out = tmp_path / "out"
    monkeypatch.delitem(sys.modules, "compare_blocking_model", raising=False)  # another test's, or the one edited
    first = compare(configs, out)
    assert first.trained == 2
    module = tmp_path / "compare_blocking_model.py"
    module.write_text(module.read_text().replace("self.bias + 0.01 *", "2 * self.bias + 0.01 *"))
    monkeypatch.delitem(sys.modules, "compare_blocking_model")  # as a new compare process imports it
    second = compare(configs, out)
    # before: both runs reused, a's test/score 0.1 from the model as it was, not 0.2
    assert second.trained == 2 and second.runs["a"][0].metrics["test/score"] == pytest.approx(0.2)
    assert compare(configs, out).trained == 0

    # a result saved before the code counted (its fingerprint without it) is reused, not trained again
    old = config_fingerprint(configs[0], code=False)
    assert old != config_fingerprint(configs[0])
    save_earlier_result(out / "runs" / "a" / "seed_0", first.runs["a"][0], old)
    assert compare(configs, out).trained == 0
    # ... but from then on it is the result of the code as it is now: editing the module again reruns it
    module.write_text(module.read_text().replace("2 * self.bias + 0.01 *", "3 * self.bias + 0.01 *"))
    monkeypatch.delitem(sys.modules, "compare_blocking_model")
    third = compare(configs, out)
    # before: the old result was reused after every edit of the model's code, for ever
    assert third.trained == 2 and third.runs["a"][0].metrics["test/score"] == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------ a wrong RAY_ADDRESS


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize("address", ["head", "closed"])
def test_a_wrong_ray_address_exits_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture, address: str) -> None:
    pytest.importorskip("ray")
    from lightning_stages.cli import main

    monkeypatch.chdir(tmp_path)
    config = blocking_config(tmp_path, "a")
    monkeypatch.setenv("RAY_ADDRESS", address if address == "head" else f"127.0.0.1:{_closed_port()}")
    args = ["compare", str(config), "--seeds", "1", "--launcher", "ray", "--out", "out", "--metrics", *METRICS]
    # before: "head" was a ValueError traceback from Ray; a closed port had Ray retry for many minutes
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare: ") and "RAY_ADDRESS" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "runs").exists()


def test_reused_runs_trained_with_other_package_versions_are_named(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stages.cli import run_store

    monkeypatch.chdir(tmp_path)
    configs = [blocking_config(tmp_path, "a", 0.1), blocking_config(tmp_path, "b")]
    out = tmp_path / "out"
    now = run_store.package_versions()
    monkeypatch.setattr(run_store, "package_versions", lambda: {**now, "lightning-stages": "0.0.1"})
    compare(configs, out)  # trained with "0.0.1"
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning) as caught:
        again = compare(configs, out)
    assert again.trained == 0  # kept: an upgrade alone does not throw finished runs away
    notes = [str(w.message) for w in caught if "other versions" in str(w.message)]
    # before: reused without a word
    assert notes == [f"compare: 2 of the reused runs trained with other versions: lightning-stages 0.0.1 (now "
                     f"{now['lightning-stages']}); their results may differ from a run now (--fresh trains every run "
                     "again)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", "compare. not like for like")
        assert compare(configs, out, fresh=True).trained == 2
        assert compare(configs, out).trained == 0  # the same versions: nothing to say


def test_a_model_package_that_cannot_be_imported_fails_its_run_not_compare(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_model_pkg").mkdir()
    (tmp_path / "broken_model_pkg" / "__init__.py").write_text("1 / 0\n")
    (tmp_path / "broken_model_pkg" / "model.py").write_text("class Net:\n    pass\n")
    config = tmp_path / "c.yaml"
    config.write_text("trainer: {max_epochs: 1, logger: false}\nmodel: {class_path: broken_model_pkg.model.Net}\n")
    result = compare([config], tmp_path / "out")  # the fingerprint looks for the model's source, and cannot import
    (run,) = result.runs["c"]
    assert run.error is not None and "division by zero" in run.error


SCHEDULED = """trainer:
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
  - class_path: lightning_stages.StageScheduleCallback
    init_args:
      stage_schedule: [{name: kd, start_epoch: 0, lambda_coef: LAMBDA}]
model: {class_path: compare_blocking_model.Blocking, init_args: {bias: 0.1}}
"""


def test_a_run_that_fails_after_a_config_change_keeps_the_finished_result_it_was_to_replace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocking_config(tmp_path, "unused")
    config = tmp_path / "a.yaml"
    config.write_text(SCHEDULED.replace("LAMBDA", "0.0"))
    first = compare([config], tmp_path / "out")
    saved = (tmp_path / "out/runs/a/seed_0/result.json").read_bytes()
    config.write_text(SCHEDULED.replace("LAMBDA", "-1"))  # a typo: the run fails
    with pytest.warns(UserWarning, match="changed since seed 0 was trained"):
        typo = compare([config], tmp_path / "out")
    assert typo.failed and "`lambda_coef` = -1: must be >= 0" in typo.runs["a"][0].error
    assert (tmp_path / "out/runs/a/seed_0/result.json").read_bytes() == saved
    config.write_text(SCHEDULED.replace("LAMBDA", "0.0"))  # the typo undone
    again = compare([config], tmp_path / "out")
    # before: the failed run had replaced the finished one, which was trained again
    assert again.trained == 0 and again.runs["a"][0].metrics == first.runs["a"][0].metrics
