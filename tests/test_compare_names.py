"""``compare``'s run folder names for config file names that are no folder name as they are (``..yaml``: ``.``,
``...yaml``: ``..``, ``.hidden.yaml``) or that are long, and a file where ``OUT/runs`` goes."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_compare_faults import fault_config

from lightning_stages.cli import main
from lightning_stages.cli.compare import OutputInUseError, run_compare
from lightning_stages.cli.compare_report import RunOutcome
from lightning_stages.cli.run_store import RESULT_FILE, load_result, run_dir, save_result, schedule_names

METRICS = ["test/score"]
pytestmark = pytest.mark.filterwarnings("ignore:compare. not like for like")  # the configs differ in bias on purpose
DOTS = ["seed_0", ".", "..", ".hidden"]  # the file names seed_0.yaml, ..yaml, ...yaml, .hidden.yaml without suffix
LONG = "x" * 200  # a legal file name; with a 60-character folder name before it, "<folder>-<name>" is not
ACCENTS = "\u00e9" * 120  # 240 bytes


def named_config(folder: Path, stem: str, bias: float = 0.0) -> Path:
    """A config of ``test_compare_faults``' tiny model (test/score = bias + 0.01 * seed) at ``folder/<stem>.yaml``."""
    return fault_config(folder, stem, bias=bias)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def compare(configs: list[Path], out: Path):
    return run_compare(configs, seeds=1, out=out, jobs=1, metrics=METRICS, curve_metric="val/x",
                       echo=lambda line: None)


def test_dot_names_get_a_folder_of_their_own_inside_runs(tmp_path: Path) -> None:
    configs = [f"hostile/{stem}.yaml" for stem in DOTS]
    names = schedule_names(configs)
    assert Path(configs[1]).stem == "." and Path(configs[2]).stem == ".."
    assert names[0] == "seed_0"  # an ordinary name keeps its folder
    folders = [run_dir(tmp_path, name, 0) for name in names]
    # before: "." ran in OUT/runs/seed_0 (seed_0's folder, emptied by its run) and ".." in OUT/seed_0
    assert [f.resolve().parent.parent for f in folders] == [tmp_path / "runs"] * 4
    assert len({f.resolve() for f in folders}) == 4
    assert all(not name.startswith(".") and "/" not in name for name in names)
    assert schedule_names(configs[::-1]) == names[::-1] == schedule_names(configs)[::-1]  # stable, not by order


@pytest.mark.parametrize("schedule", ["", ".", "..", "a/b"])
def test_run_dir_refuses_a_name_that_is_not_one_folder(tmp_path: Path, schedule: str) -> None:
    with pytest.raises(ValueError, match="not one folder name"):
        run_dir(tmp_path, schedule, 0)  # before: a folder outside runs/<schedule>/, or another schedule's


def test_long_names_are_short_distinct_and_stable(tmp_path: Path) -> None:
    configs = [f"{'A' * 60}/{LONG}.yaml", f"{'B' * 60}/{LONG}.yaml", f"c/{'y' * 240}.yaml", f"c/{ACCENTS}.yaml"]
    names = schedule_names(configs)
    assert len(set(names)) == 4 and schedule_names(configs[::-1]) == names[::-1]
    assert all(len(name.encode()) <= 255 for name in names)  # before: 261 bytes, twice
    assert names[0].startswith("A" * 20) and names[2].startswith("y" * 20)  # readable
    for name in names:  # each makes a folder (before: OSError: File name too long)
        run_dir(tmp_path, name, 0).mkdir(parents=True)
    assert len(list((tmp_path / "runs").iterdir())) == 4


def test_ordinary_names_keep_their_folders() -> None:
    """Existing OUT directories are reused: names that were folder names (at most 255 bytes) stay as they were."""
    assert schedule_names(["a/x.yaml", "b/x.yaml", "s_joint.yaml", "-dash.yaml", "a.b.c.yaml"]) == [
        "a-x", "b-x", "s_joint", "-dash", "a.b.c"]
    assert schedule_names([f"{'z' * 255}.yaml", f"c/{'y' * 240}.yaml"]) == ["z" * 255, "y" * 240]
    assert schedule_names(["p/a/x.yaml", "q/a/x.yaml", "a-x.yaml"])[2] == "a-x"


def test_a_dot_named_schedule_s_result_is_reused_and_another_s_is_kept(tmp_path: Path) -> None:
    names = schedule_names([f"hostile/{stem}.yaml" for stem in DOTS])
    for i, name in enumerate(names):
        save_result(run_dir(tmp_path, name, 0), RunOutcome(name, 0, metrics={"test/score": float(i)}), f"f{i}")
    for i, name in enumerate(names):  # before: "." overwrote seed_0's result and neither was reused
        kept = load_result(run_dir(tmp_path, name, 0), f"f{i}", METRICS)
        assert kept is not None and kept.metrics == {"test/score": float(i)}
    assert sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob(RESULT_FILE)) == ["runs"] * 4


def test_compare_of_dot_and_long_names_keeps_and_reuses_every_run(here: Path) -> None:
    configs = [named_config(here / "hostile", stem, bias=0.1 * i) for i, stem in enumerate(DOTS)]
    configs += [named_config(here / ("A" * 60), LONG, bias=0.5), named_config(here / ("B" * 60), LONG, bias=0.6)]
    out = here / "out"
    first = compare(configs, out)  # before: OSError: File name too long
    assert not first.failed and first.trained == 6
    scores = {name: runs[0].metrics["test/score"] for name, runs in first.runs.items()}
    assert sorted(scores.values()) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.5, 0.6])
    assert {p.name for p in out.iterdir()} <= {"runs", "report.md", "curves.png", ".compare.lock"}
    assert len(list(out.rglob(RESULT_FILE))) == 6
    second = compare(configs, out)  # before: seed_0's and "."'s runs trained again
    assert second.trained == 0
    assert {name: runs[0].metrics["test/score"] for name, runs in second.runs.items()} == scores


def test_a_file_where_out_runs_goes_exits_2_with_one_line(here: Path, capsys: pytest.CaptureFixture) -> None:
    config = named_config(here, "a")
    (here / "out").mkdir()
    (here / "out" / "runs").write_text("mine")
    code = main(["compare", str(config), "--seeds", "1", "--jobs", "1", "--out", "out", "--metrics", *METRICS,
                 "--curve-metric", "val/x"])  # before: a NotADirectoryError traceback, exit 1
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("compare: ") and f"{here / 'out' / 'runs'} is not a folder" in err
    assert (here / "out" / "runs").read_text() == "mine" and not (here / "out" / "report.md").exists()
    (here / "out" / "runs").unlink()
    (here / "out" / "runs").symlink_to(here / "nowhere")  # a broken link: refused alike, never followed
    with pytest.raises(OutputInUseError, match="is not a folder"):
        compare([config], here / "out")
    assert not (here / "nowhere").exists()


def test_a_config_given_twice_with_a_name_near_the_limit_stays_within_it(tmp_path: Path) -> None:
    config = f"c/{'q' * 245}.yaml"  # told apart by a hash: "q...q-<8 hex>", 254 bytes; the second one's "_2" more
    names = schedule_names([config, config])
    assert len(names[0].encode()) == 254 and names[1] != names[0]
    assert all(len(name.encode()) <= 255 for name in names), [len(n) for n in names]  # before: 254, then 256
    for name in names:
        run_dir(tmp_path, name, 0).mkdir(parents=True)
