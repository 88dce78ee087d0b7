"""Config and CLI input found wrong in review (issue 10): each bad input is a ``StageConfigError`` naming the stage,
the field and the value (exit 2 and a short message from the command line), a damaged checkpoint state warns or is
refused, and nothing escapes as a raw exception.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_stages.cli import main


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _json(tmp_path: Path, data: object, name: str = "c.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_seed_config_with_a_model_key_still_has_its_schedule_checked(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    path = _json(tmp_path, {"model": {}, "data": {"root": "x"}, "train": {"epochs": 4},
                            "stage_schedule": [{"name": "a", "start_epoch": 0, "lambda_coef": -5}]})
    code, out, err = _run(capsys, "validate", str(path))
    assert code == 2 and "OK" not in out
    assert "stage 0 ('a')" in err and "`lambda_coef` = -5" in err


@pytest.mark.parametrize(("callbacks", "field", "value"), [
    ("7", "trainer.callbacks", "7"),
    ("[{class_path: lightning_stages.StageScheduleCallback, init_args: [1, 2]}]", "trainer.callbacks[0].init_args",
     "[1, 2]"),
    ("[{class_path: lightning_stages.StageScheduleCallback, init_args: abc}]", "trainer.callbacks[0].init_args",
     "'abc'"),
])
@pytest.mark.parametrize("no_import", [False, True])
def test_lightning_config_callbacks_of_the_wrong_shape_are_a_problem_naming_the_field(
        tmp_path: Path, capsys: pytest.CaptureFixture, callbacks: str, field: str, value: str, no_import: bool) -> None:
    path = tmp_path / "cli.yaml"
    path.write_text(f"trainer:\n  max_epochs: 5\n  callbacks: {callbacks}\n")
    code, out, err = _run(capsys, "validate", *(["--no-import"] if no_import else []), str(path))
    assert code == 2 and out == ""
    assert f"`{field}` = {value}: must be a" in err and "Traceback" not in err
