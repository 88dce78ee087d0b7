"""``compare --launcher ray``: each run a Ray task, here on a local Ray with 2 CPUs (skipped without Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import compare_config as tiny_config
from conftest import make_tiny_teacher

from lightning_stages.cli import main
from lightning_stages.cli.compare import run_compare
from lightning_stages.cli.launchers import RayLauncher

ray = pytest.importorskip("ray")

KD_THEN_FT = [{"name": "kd", "start_epoch": 0, "end_epoch": 1, "distillation": True, "lambda_coef": 1.0},
              {"name": "ft", "start_epoch": 1, "distillation": False}]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def quiet(line: str) -> None:
    pass


def test_ray_tasks_give_the_runs_of_the_local_launcher(local_ray: None, tmp_path: Path) -> None:
    teacher = make_tiny_teacher(tmp_path / "teacher.ckpt")
    configs = [tiny_config(tmp_path / "r_kd_ft.yaml", teacher, KD_THEN_FT), tiny_config(tmp_path / "r_labels.yaml",
                                                                                        teacher)]
    on_ray = run_compare(configs, seeds=[0], out=tmp_path / "ray", launcher="ray", ray_num_cpus=1, echo=quiet)
    local = run_compare(configs, seeds=[0], out=tmp_path / "local", jobs=1, echo=quiet)
    assert not on_ray.failed and on_ray.trained == 2
    assert ray.is_initialized(), "a Ray the caller started is left running"
    for name in ("r_kd_ft", "r_labels"):
        (remote,), (here,) = on_ray.runs[name], local.runs[name]
        assert remote.metrics == here.metrics and remote.teacher_forwards == here.teacher_forwards
        assert (tmp_path / "ray" / "runs" / name / "seed_0" / "result.json").is_file()
    again = run_compare(configs, seeds=[0], out=tmp_path / "ray", launcher="ray", echo=quiet)
    assert again.trained == 0  # finished Ray runs are reused like local ones


def test_ray_reads_its_address_from_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert RayLauncher().address == "ray://head:10001"
    monkeypatch.delenv("RAY_ADDRESS")
    assert RayLauncher(num_cpus=2, num_gpus=1).address is None
    with pytest.raises(ValueError, match="num_cpus > 0"):
        RayLauncher(num_cpus=0)


def test_jobs_with_ray_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "a.yaml"
    config.write_text("trainer: {}")
    assert main(["compare", str(config), "--launcher", "ray", "--jobs", "2"]) == 2
    assert "--jobs is for the local launcher" in capsys.readouterr().err
