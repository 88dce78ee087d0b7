"""A config edited while ``compare`` runs: a run may have trained either version, so its result is not kept under the
fingerprint the comparison started with (a later ``compare`` would reuse it as the config's)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_compare_faults import MODEL as FAULT_MODEL

from lightning_stages.cli.compare import run_compare
from lightning_stages.cli.run_store import RESULT_FILE

MODEL = """
import os
from pathlib import Path

from compare_fault_model import Fault


class Edits(Fault):
    \"\"\"``Fault`` (test/score = bias + 0.01 * seed); the run of seed 0 edits the config `edit` once (bias 0.1 -> 0.7)
    as it ends, as a user editing the file while the comparison runs; every run writes `cache_file`.\"\"\"

    def __init__(self, bias: float = 0.0, edit: str = "", cache_file: str = "") -> None:
        super().__init__(bias=bias)
        self.edit, self.cache_file = edit, cache_file

    def test_step(self, batch, batch_idx):
        super().test_step(batch, batch_idx)
        seed = int(os.environ["PL_GLOBAL_SEED"])
        if self.cache_file:  # a file the config names, which the run writes (no edit of the user's)
            Path(self.cache_file).write_text(f"written by the run of seed {seed}")
        marker = Path(self.edit + ".edited")
        if seed == 0 and self.edit and not marker.exists():
            marker.write_text("")
            config = Path(self.edit)
            config.write_text(config.read_text().replace("bias: 0.1", "bias: 0.7"))
"""


def _modules(folder: Path) -> None:
    (folder / "compare_fault_model.py").write_text(FAULT_MODEL)
    (folder / "compare_edit_model.py").write_text(MODEL)


def _compare(config: Path, out: Path):
    return run_compare([config], seeds=2, out=out, jobs=1, metrics=["test/score"], curve_metric="val/x",
                       echo=lambda line: None)


def test_runs_of_a_config_edited_during_the_compare_are_not_kept_and_a_later_compare_trains_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _modules(tmp_path)
    config = tmp_path / "labels.yaml"
    original = ("trainer: {max_epochs: 1, logger: false, enable_checkpointing: false, accelerator: cpu, devices: 1, "
                "enable_progress_bar: false}\n"
                f"model: {{class_path: compare_edit_model.Edits, init_args: {{bias: 0.1, edit: '{config}'}}}}\n")
    config.write_text(original)
    first = _compare(config, tmp_path / "out")
    assert config.read_text() != original  # the run of seed 0 edited it; seed 1 then trained the edited config
    errors = [run.error for run in first.runs["labels"]]
    assert all(error is not None and error.startswith("ChangedDuringCompare") for error in errors), errors
    assert not list((tmp_path / "out/runs").rglob(RESULT_FILE)) or all(
        "ChangedDuringCompare" in path.read_text() for path in (tmp_path / "out/runs").rglob(RESULT_FILE))
    config.write_text(original)  # the user puts the line back: no run of the first compare stands for it
    second = _compare(config, tmp_path / "out")
    assert second.trained == 2
    assert [run.metrics["test/score"] for run in second.runs["labels"]] == pytest.approx([0.1, 0.11])
    third = _compare(config, tmp_path / "out")
    assert third.trained == 0
    assert [run.metrics["test/score"] for run in third.runs["labels"]] == pytest.approx([0.1, 0.11])


def test_a_file_the_config_names_and_the_run_writes_is_no_edit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _modules(tmp_path)
    (tmp_path / "cache.txt").write_text("there before the compare")
    config = tmp_path / "labels.yaml"
    config.write_text("trainer: {max_epochs: 1, logger: false, enable_checkpointing: false, accelerator: cpu, "
                      "devices: 1, enable_progress_bar: false}\n"
                      "model: {class_path: compare_edit_model.Edits, init_args: {bias: 0.1, cache_file: cache.txt}}\n")
    result = _compare(config, tmp_path / "out")
    assert [run.error for run in result.runs["labels"]] == [None, None]
    assert [run.metrics["test/score"] for run in result.runs["labels"]] == pytest.approx([0.1, 0.11])
