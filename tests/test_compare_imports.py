"""``compare``'s fingerprint of a run counts the working directory's modules that the model's module imports, through
their imports in turn: editing a helper module makes the finished runs stale, as editing the model's module does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import save_earlier_result

from lightning_stages.cli.compare import run_compare
from lightning_stages.cli.run_fingerprint import config_fingerprint, config_fingerprints, source_digests
from lightning_stages.cli.run_store import save_result

pytestmark = pytest.mark.filterwarnings("ignore:compare. not like for like")

MODEL = """
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from imports_helper import OFFSET


class Scored(pl.LightningModule):
    \"\"\"test/score = OFFSET (from the helper module it imports) + bias.\"\"\"

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.bias = bias
        self.layer = torch.nn.Linear(2, 1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)

    def test_dataloader(self):
        return self.train_dataloader()

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def test_step(self, batch, batch_idx):
        self.log("test/score", OFFSET + self.bias)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
"""


def _forget(*modules: str) -> None:
    for name in modules:
        sys.modules.pop(name, None)


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


TRAINER = ("trainer: {max_epochs: 1, logger: false, enable_checkpointing: false, accelerator: cpu, devices: 1, "
           "enable_progress_bar: false}\n")


def _scored_project(folder: Path, biases: dict[str, float]):
    """The model importing its helper (OFFSET 0.0), a config per ``{name: bias}``; returns ``compare()``, one
    comparison of them into ``folder / "out"`` as a new process would run it (the modules imported afresh)."""
    _write(folder, {"imports_model.py": MODEL, "imports_helper.py": "OFFSET = 0.0\n",
                    **{f"{name}.yaml": TRAINER + f"model: {{class_path: imports_model.Scored, init_args: {{bias: {bias}}}}}\n"
                       for name, bias in biases.items()}})

    def compare():
        _forget("imports_model", "imports_helper")
        return run_compare([folder / f"{name}.yaml" for name in biases], seeds=1, out=folder / "out", jobs=1,
                           metrics=["test/score"], curve_metric="val/x", echo=lambda line: None)
    return compare


def test_the_modules_a_named_module_imports_count_and_nothing_installed(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path, {
        "fp_pkg/__init__.py": "",
        # relative, absolute, in a function, a submodule taken with `from package import`, a name taken from a module
        "fp_pkg/model.py": ("from .layers import Block\nimport fp_helpers\nimport torch\nimport json.decoder\n"
                            "def make():\n    from fp_pkg import losses\n    return losses\n"),
        "fp_pkg/layers.py": "from . import deep\nfrom .deep import DEPTH\nclass Block: pass\n",
        "fp_pkg/deep.py": "DEPTH = 2\n",
        "fp_pkg/losses.py": "",
        "fp_pkg/unused.py": "",
        "fp_helpers.py": "import fp_pkg.model\n",  # a cycle
    })
    _forget("fp_pkg", "fp_pkg.model", "fp_pkg.layers", "fp_pkg.deep", "fp_pkg.losses", "fp_helpers")
    config = [{"model": {"class_path": "fp_pkg.model.Net"}}]
    # before: only the named module counted
    assert sorted(source_digests(config)) == ["fp_helpers", "fp_pkg", "fp_pkg.deep", "fp_pkg.layers", "fp_pkg.losses",
                                              "fp_pkg.model"]
    assert list(source_digests(config, imported=False)) == ["fp_pkg.model"]
    # `from .deep import DEPTH`: DEPTH is a name in a module, never looked up as a module (which would import it)
    assert "fp_pkg.deep" not in sys.modules


def test_editing_an_imported_helper_changes_the_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path, {"imports_model.py": MODEL, "imports_helper.py": "OFFSET = 0.0\n", "unrelated.py": "X = 1\n",
                      "a.yaml": "model: {class_path: imports_model.Scored}\n"})
    _forget("imports_model", "imports_helper")
    before = config_fingerprint(tmp_path / "a.yaml")
    (tmp_path / "unrelated.py").write_text("X = 2\n")
    assert config_fingerprint(tmp_path / "a.yaml") == before
    (tmp_path / "imports_helper.py").write_text("OFFSET = 5.0\n")
    # before: the same fingerprint, so compare reused the runs of the helper as it was
    assert config_fingerprint(tmp_path / "a.yaml") != before


def test_compare_reruns_after_a_helper_edit_and_reuses_results_saved_before_imports_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    compare = _scored_project(tmp_path, {"a": 0.1, "b": 0.2})
    configs, out = [tmp_path / "a.yaml", tmp_path / "b.yaml"], tmp_path / "out"
    first = compare()
    assert first.trained == 2 and first.runs["a"][0].metrics["test/score"] == pytest.approx(0.1)
    (tmp_path / "imports_helper.py").write_text("OFFSET = 5.0\n")
    second = compare()
    # before: both reused, test/score 0.1 from the helper as it was, not 5.1
    assert second.trained == 2 and second.runs["a"][0].metrics["test/score"] == pytest.approx(5.1)
    assert compare().trained == 0

    # a result saved by an earlier version (the named module's code only) is reused, not trained again...
    current, named_only, without_code = config_fingerprints(configs[0])
    assert len({current, named_only, without_code}) == 3
    save_earlier_result(out / "runs" / "a" / "seed_0", second.runs["a"][0], named_only)
    assert compare().trained == 0
    # ... and from then on it is the result of the helper as it is now: editing it again reruns it
    (tmp_path / "imports_helper.py").write_text("OFFSET = 7.0\n")
    third = compare()
    assert third.trained == 2 and third.runs["a"][0].metrics["test/score"] == pytest.approx(7.1)


def test_a_folder_without_init_counts_its_modules_and_the_standard_library_never(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path, {"ns_models/net.py": "from . import layers\nfrom ns_models import blocks\n",
                      "ns_models/layers.py": "", "ns_models/blocks.py": ""})  # no __init__.py: a namespace package
    _forget("ns_models", "ns_models.net", "ns_models.layers", "ns_models.blocks")
    # before: ['ns_models.net'] only, so editing layers.py reused the stale runs
    assert sorted(source_digests([{"model": {"class_path": "ns_models.net.Net"}}])) == [
        "ns_models.blocks", "ns_models.layers", "ns_models.net"]
    # a working directory that holds this Python (a conda env made inside the project): its library never counts
    monkeypatch.chdir("/")
    assert source_digests([{"model": {"class_path": "json.decoder.JSONDecoder"}}]) == {}


def test_a_project_module_named_like_a_library_module_counts_and_a_failing_package_does_not_stop_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path, {"lib_named/__init__.py": "", "lib_named/model.py": "import trace\nfrom .. import beyond\n",
                      "trace.py": "X = 1\n", "beyond.py": "",
                      "exiting/__init__.py": "import sys\nsys.exit(3)\n", "exiting_model.py": "import exiting.sub\n"})
    _forget("lib_named", "lib_named.model", "trace", "beyond", "exiting", "exiting.sub", "exiting_model")
    # trace.py is what `import trace` imports from the working directory; before: never counted
    # `from .. import beyond` goes beyond the top package (Python refuses it): nothing counts for it
    assert sorted(source_digests([{"model": {"class_path": "lib_named.model.Net"}}])) == [
        "lib_named", "lib_named.model", "trace"]
    # a project package whose __init__ exits when imported; before: SystemExit out of compare
    assert sorted(source_digests([{"model": {"class_path": "exiting_model.Net"}}])) == ["exiting_model"]


def test_more_project_modules_than_followed_are_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stages.cli import run_fingerprint

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(run_fingerprint, "_MAX_MODULES", 3)
    _write(tmp_path, {f"chain_{i}.py": f"import chain_{i + 1}\n" for i in range(6)})
    _forget(*(f"chain_{i}" for i in range(7)))
    # before: the modules past the limit were dropped without a word (an edit of one reused stale runs)
    with pytest.warns(UserWarning, match=r"import more than 3 modules of the working directory.*--fresh"):
        assert sorted(source_digests([{"model": {"class_path": "chain_0.Net"}}])) == ["chain_0", "chain_1", "chain_2"]


def test_a_result_this_version_saved_without_code_is_not_taken_for_an_earlier_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From another working directory the model's module is not the project's, so a run is saved under the
    fingerprint without code. Back in the project, that result must not pass for one an earlier version saved (it
    was reused, and adopted, for every later edit of the model)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    compare = _scored_project(tmp_path, {"a": 0.1})
    out = tmp_path / "out"

    first = compare()
    _, _, without_code = config_fingerprints(tmp_path / "a.yaml")
    save_result(out / "runs" / "a" / "seed_0", first.runs["a"][0], without_code)  # as saved from elsewhere
    (tmp_path / "imports_helper.py").write_text("OFFSET = 5.0\n")
    again = compare()
    # before: reused (test/score 0.1), and from then on for every edit
    assert again.trained == 1 and again.runs["a"][0].metrics["test/score"] == pytest.approx(5.1)


def test_a_function_named_by_its_import_path_in_init_args_counts(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path, {"scorefns.py": "def score(x):\n    return 1.0\n", "other_data.py": "",
                      "a.yaml": "model: {class_path: torch.nn.Identity, init_args: {fn: scorefns.score}}\n"
                                "data: {init_args: {file: other_data.csv}}\n"})
    _forget("scorefns", "other_data")
    before = config_fingerprint(tmp_path / "a.yaml")
    (tmp_path / "scorefns.py").write_text("def score(x):\n    return 2.0\n")
    # before: the same fingerprint (a bare import path counted only under model, data, callbacks...)
    assert config_fingerprint(tmp_path / "a.yaml") != before
