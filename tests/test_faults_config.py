"""Config input never escapes as a raw exception, and never silently means something else.

Each hostile file below gives a ``StageConfigError`` naming the file from Python, and exit 2 with one line naming the
file from ``lightning-stages validate``: binary files, numbers too long or too large, deep nesting, YAML that refers
to itself or whose aliases expand too far, and keys given twice (which JSON and YAML parsers would silently read as
the last one). ``show`` escapes hostile names; ``--no-import`` runs no code of the config's class paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from lightning_stages import StageConfigError, StageSchedule
from lightning_stages.cli import main
from lightning_stages.cli.lightning_config import schedule_of_config
from lightning_stages.errors import StageProblem, short_repr
from lightning_stages.schedule import config_input, seed_format


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The 'billion laughs': each anchor repeats the previous one ``width`` times (``width ** levels`` strings)."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join([*lines, "stage_schedule:", "- start_epoch: 0", f"  name: *a{levels - 1}", ""])


HOSTILE = {
    "binary": ("bin.json", bytes(range(256)) * 4, "not a text file"),
    "5000 digits (JSON)": ("n5000.json", b'{"stage_schedule": [\n{"start_epoch": 0,\n "lambda_coef": ' + b"9" * 5000
                           + b"}]}", "n5000.json:3: a number has more than"),
    "5000 digits (YAML)": ("n5000.yaml", b"stage_schedule:\n- start_epoch: 0\n  lambda_coef: " + b"9" * 5000 + b"\n",
                           "n5000.yaml:3: a number has more than"),
    "100,000-deep JSON": ("deep.json", b'{"stage_schedule": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                          "nested too deeply"),
    "100,000-deep YAML": ("deep.yaml", b"stage_schedule: " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
                          "nested too deeply"),
    "150-deep stage field": ("deep150.json", b'{"stage_schedule": [{"start_epoch": 0, "name": ' + b"[" * 150
                             + b"]" * 150 + b"}]}", "nested too deeply"),
    "alias bomb": ("bomb.yaml", _alias_bomb().encode(), "expands to more than"),
    "self-reference": ("self.yaml", b"stage_schedule: &s [*s]\n", "refers to itself"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_are_a_stage_config_error_naming_the_file(tmp_path: Path, case: str) -> None:
    name, content, expected = HOSTILE[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(StageConfigError) as caught:
        StageSchedule.from_config(path)
    message = str(caught.value)
    assert expected in message and name in message
    assert len(message) < 600  # nothing expanded into the message


@pytest.mark.parametrize("case", ["binary", "5000 digits (JSON)", "100,000-deep YAML", "alias bomb", "self-reference"])
def test_hostile_files_exit_2_with_one_line_naming_the_file(tmp_path: Path, case: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    name, content, expected = HOSTILE[case]
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and expected in err
    assert "Traceback" not in err


def test_the_alias_bomb_is_refused_without_expanding_it(tmp_path: Path) -> None:
    """Counting what aliases expand to takes one pass over the distinct values, not over the expansion: a bomb of
    10^18 strings is refused as fast as one of 10^8 (both well under a second; not asserted as time, counted)."""
    data = yaml.safe_load(_alias_bomb(levels=18, width=10))
    distinct = set()
    stack = [data]
    while stack:
        item = stack.pop()
        if id(item) not in distinct and isinstance(item, (list, dict)):
            distinct.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    assert len(distinct) == 18 + 3  # what the check walks: each anchor once, the root, the list, the stage
    with pytest.raises(StageConfigError, match="expands to more than"):
        config_input.check_shape(data, "b.yaml")


def test_anchors_and_merge_keys_within_the_limits_are_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {start_epoch: 0, end_epoch: 2, distillation: true}\n"
                    "stage_schedule:\n- <<: *b\n  distillation: false\n- {start_epoch: 2, name: *b}\n")
    data = seed_format.load_config(path)
    assert data["stage_schedule"][0] == {"start_epoch": 0, "end_epoch": 2, "distillation": False}


# ---------------------------------------------------------------------------------------------- duplicate keys


@pytest.mark.parametrize(("name", "text", "key", "lines"), [
    ("plain.json", '{"stage_schedule": [{"start_epoch": 0},\n {"start_epoch": 1}],\n "train": {"epochs": 3},\n'
                   ' "stage_schedule": []}', "stage_schedule", (1, 4)),
    ("comments.json", '// a comment makes it JSON5\n{"stage_schedule": [{"start_epoch": 0, "distillation": true,\n'
                      '  /* "distillation": x */ "distillation": false}]}', "distillation", (2, 3)),
    ("flip.yaml", "stage_schedule:\n- start_epoch: 0\n  distillation: true\n  lambda_coef: 1\n  distillation: false\n",
     "distillation", (3, 5)),
    ("root.yaml", "stage_schedule:\n- start_epoch: 0\ntrain: {epochs: 4}\nstage_schedule: []\n", "stage_schedule",
     (1, 4)),
    # a single-quoted key with an escape, as JSON with comments allows: the same key (before: named without lines)
    ("escaped.json", "{'stage_schedule': [{'start_epoch': 0,\n 'na\\x6de': 'a',\n name: 'b'}]} // c", "name", (2, 3)),
])
def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path: Path, name: str, text: str, key: str,
                                                        lines: tuple[int, int]) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(StageConfigError) as caught:
        StageSchedule.from_config(path)
    assert f"the key {key!r} is given twice in one mapping (lines {lines[0]} and {lines[1]})" in str(caught.value)
    assert str(path) in str(caught.value)


def test_the_same_key_in_two_mappings_is_not_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"stage_schedule": [{"name": "a", "start_epoch": 0, "end_epoch": 1},
                                                   {"name": "b", "start_epoch": 1}]}))
    assert [s.name for s in StageSchedule.from_config(path).stages] == ["a", "b"]


def test_plain_json_is_read_by_json_loads_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path: a plain JSON config never reaches the (slow, pure-Python) json5 parser."""
    calls = []
    monkeypatch.setattr(config_input.json5, "loads", lambda *a, **k: calls.append(a) or {})
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"dataset": {"files": [f"img_{i}.png" for i in range(10_000)]},
                                "stage_schedule": [{"start_epoch": 0}]}))
    assert len(StageSchedule.from_config(path).stages) == 1
    assert calls == []
    path.write_text('{"stage_schedule": [] // with a comment\n}')
    StageSchedule.from_config(path)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------- messages


def test_messages_quote_values_shortened() -> None:
    huge = list(range(10**6))
    text = str(StageProblem("must be a number", index=0, field="lambda_coef", value=huge))
    assert len(text) < 200 and text.startswith("stage 0: `lambda_coef` = [0, 1, 2, 3, 4, 5, ...]")
    assert short_repr(10**5000) == "<an integer of more than 4999 digits>"  # repr() itself would raise
    assert short_repr("\x1b[2J") == repr("\x1b[2J")


def test_a_number_too_large_for_a_float_is_named_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(StageConfigError, match=r"`loss_weights.bce` = <an integer of more than 399 digits>: is too large"):
        StageSchedule([{"start_epoch": 0, "loss_weights": {"bce": 10**400}}], loss_weights={"bce": 1.0})
    path = tmp_path / "n400.json"
    path.write_text('{"stage_schedule": [{"start_epoch": 0, "lambda_coef": ' + "9" * 400 + "}]}")
    assert main(["validate", str(path)]) == 2
    assert "stage 0: `lambda_coef` = <an integer of more than 399 digits>: is too large" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- show


def test_show_escapes_hostile_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake_row = "warm\n[9, 99)  fake (9/9)  on  1  0"
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps({
        "train": {"epochs": 4, "loss_weights": {"bce": 1, "x\x1b[31m": 1}},
        "stage_schedule": [{"name": fake_row, "start_epoch": 0, "end_epoch": 2},
                           {"name": "clear\x1b[2J", "start_epoch": 2}],
    }))
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    table = out.splitlines()[1:]
    assert len(table) == 3  # header and two ranges: the newline did not add a row
    assert table[1].split()[2:4] == ["warm\\n[9,", "99)"] and "clear\\x1b[2J (2/2)" in table[2]
    assert table[0].split()[-1] == "x\\x1b[31m"


def test_show_plot_without_suffix_writes_the_png_it_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"train": {"epochs": 2}, "stage_schedule": [{"name": "a$b", "start_epoch": 0}]}))
    assert main(["show", str(path), "--plot", str(tmp_path / "timeline")]) == 0
    assert f"timeline written to {tmp_path / 'timeline.png'} (.png added)" in capsys.readouterr().out
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "timeline").exists()


@pytest.mark.parametrize("plot", ["t.txt", "timeline.pdf"])
def test_show_plot_with_another_suffix_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture, plot: str) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"stage_schedule": []}')
    assert main(["show", str(path), "--plot", str(tmp_path / plot)]) == 2
    err = capsys.readouterr().err
    assert "--plot writes a PNG: give a path ending in .png" in err and "Traceback" not in err
    assert not (tmp_path / plot).exists()


# ---------------------------------------------------------------------------------------------- --no-import


def _config_with_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A LightningCLI config whose model and callback class paths name a module that writes a file on import."""
    (tmp_path / "evil_module.py").write_text(
        "import pathlib\npathlib.Path('IMPORTED').write_text('ran')\n"
        "import lightning.pytorch as pl\n"
        "class Model(pl.LightningModule):\n    def __init__(self, loss_weights={'bce': 1.0}):\n        super().__init__()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "evil_module", raising=False)
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"class_path": "evil_module.Model"},
        "trainer": {"max_epochs": 4, "callbacks": [
            {"class_path": "lightning_stages.StageScheduleCallback",
             "init_args": {"stage_schedule": [{"name": "kd", "start_epoch": 0, "end_epoch": 2,
                                               "loss_weights": {"bce": 0.0}}]}},
            {"class_path": "evil_module.Callback"},
        ]},
    }))
    return path


def test_validate_imports_class_paths_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    path = _config_with_code(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))
    main(["validate", str(path)])
    assert (tmp_path / "IMPORTED").exists()  # what --no-import is for


def test_no_import_runs_no_code_and_checks_the_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    path = _config_with_code(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["validate", "--no-import", str(path)]) == 0
    captured = capsys.readouterr()
    assert not (tmp_path / "IMPORTED").exists() and "evil_module" not in sys.modules
    assert captured.out.startswith(f"OK {path}: 1 stage over 4 epochs (kd [0, 2), base [2, 4))")
    assert "--no-import: no class_path was imported" in captured.err
    # a schedule problem is still found statically
    bad = yaml.safe_load(path.read_text())
    bad["trainer"]["callbacks"][0]["init_args"]["stage_schedule"][0]["lamda_coef"] = 1
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(StageConfigError, match="did you mean `lambda_coef`"):
        schedule_of_config(path, import_modules=False)
    assert not (tmp_path / "IMPORTED").exists()


# ---------------------------------------------------------------------------------------------- seventeenth session


@pytest.mark.parametrize(("value", "tag"), [("!!timestamp foo", "!!timestamp"), ("!!bool maybe", "!!bool"),
                                            ("!!int ''", "!!int"), ("!!float ''", "!!float")])
def test_a_value_its_tag_cannot_read_is_named_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             value: str, tag: str) -> None:
    """PyYAML's constructors raise AttributeError, KeyError or IndexError for these: they escaped as tracebacks."""
    path = tmp_path / "tag.yaml"
    path.write_text(f"stage_schedule:\n- start_epoch: 0\n  name: {value}\n")
    with pytest.raises(StageConfigError, match=rf"tag.yaml:3:\d+: not valid YAML: cannot read .* as {tag}"):
        StageSchedule.from_config(path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"as {tag}" in err and "Traceback" not in err


@pytest.mark.parametrize(("text", "expected"), [
    # an alias of a key already in the mapping: the same key node twice (it was read as the last value, silently)
    ("stage_schedule:\n- {&k distillation: true, start_epoch: 0, *k : false}\n",
     "the key 'distillation' is given twice in one mapping (line 2, column 4, and again through an alias of it)"),
    # two merge keys: the later one's values won, silently (one merge key may list several mappings)
    ("a: &a {distillation: true}\nb: &b {distillation: false}\nstage_schedule:\n- <<: *a\n  <<: *b\n  start_epoch: 0\n",
     "the key '<<' is given twice in one mapping (lines 4 and 5)"),
])
def test_a_key_repeated_through_an_alias_or_a_second_merge_key_is_refused(tmp_path: Path, text: str,
                                                                          expected: str) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(StageConfigError) as caught:
        StageSchedule.from_config(path)
    assert expected in str(caught.value)


def test_one_merge_key_of_several_mappings_is_read(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("a: &a {distillation: true}\nb: &b {end_epoch: 2}\nstage_schedule:\n- <<: [*a, *b]\n"
                    "  start_epoch: 0\n")
    assert seed_format.load_config(path)["stage_schedule"][0] == {"distillation": True, "end_epoch": 2,
                                                                  "start_epoch": 0}


def test_a_chain_of_merges_with_overrides_is_read(tmp_path: Path) -> None:
    """`mid` overrides what it merges from `base`, and a stage merges `mid`: PyYAML had rewritten `mid` (its merge
    key replaced by base's pairs) by the time `mid` itself was checked, which then showed `end_epoch` twice."""
    path = tmp_path / "chain.yaml"
    path.write_text("defaults:\n  base: &base {start_epoch: 0, end_epoch: 1}\n  mid: &mid\n    <<: *base\n"
                    "    end_epoch: 2\nfirst:\n  <<: *mid\nstage_schedule:\n- <<: *mid\n  distillation: true\n")
    data = seed_format.load_config(path)
    assert data["stage_schedule"][0] == {"start_epoch": 0, "end_epoch": 2, "distillation": True}
    assert data["defaults"]["mid"] == data["first"] == {"start_epoch": 0, "end_epoch": 2}


def test_a_duplicate_anchor_is_named(tmp_path: Path) -> None:
    path = tmp_path / "anchor.yaml"
    path.write_text("a: &x 1\nb: &x 2\nstage_schedule: []\n")
    with pytest.raises(StageConfigError, match=r"anchor.yaml:2:\d+: not valid YAML: found duplicate anchor 'x'; "
                                               r"first occurrence \(line 1\), second occurrence"):
        StageSchedule.from_config(path)


@pytest.mark.parametrize(("name", "content"), [
    ("esc.json", b'{"stage_schedule": [\x1b]}'),  # the parser quotes the control character
    ("long.yaml", b"stage_schedule: *" + b"a" * 100_000 + b"\n"),  # an unknown alias of 100,000 characters
])
def test_the_parsers_words_reach_the_terminal_escaped_and_short(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "\x1b" not in err and len(err) <= 2100 and err.startswith(str(path))


@pytest.mark.parametrize("plot", [".", "/", "..", ""])
def test_show_plot_of_a_path_with_no_file_name_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        plot: str) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"stage_schedule": []}')
    assert main(["show", str(path), "--plot", plot]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"--plot: {plot!r} names no file; give a path ending in .png"


def test_show_plot_writes_the_png_it_names_even_with_leading_dots(tmp_path: Path, capsys: pytest.CaptureFixture):
    """matplotlib read `...png` as a name without an extension and wrote `...png.png`, which show did not report."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "s.json"
    path.write_text('{"train": {"epochs": 2}, "stage_schedule": [{"name": "a", "start_epoch": 0}]}')
    assert main(["show", str(path), "--plot", str(tmp_path / "...png")]) == 0
    assert f"timeline written to {tmp_path / '...png'}\n" in capsys.readouterr().out
    assert (tmp_path / "...png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "...png.png").exists()


def _lightning_config(tmp_path: Path, trainer: dict, stages: list, model: dict | None = None) -> Path:
    path = tmp_path / "cli.yaml"
    config = {"trainer": {**trainer, "callbacks": [{"class_path": "lightning_stages.StageScheduleCallback",
                                                    "init_args": {"stage_schedule": stages}}]}}
    path.write_text(yaml.safe_dump({**({"model": model} if model else {}), **config}))
    return path


def test_a_run_of_too_many_steps_is_refused_as_too_many_epochs_are(tmp_path: Path) -> None:
    stages = [{"name": "a", "start_step": 0, "end_step": 5}, {"name": "b", "start_step": 5}]
    path = _lightning_config(tmp_path, {"max_steps": 10**400}, stages)
    with pytest.raises(StageConfigError, match=r"base: `max_steps` = <an integer of more than 399 digits>: is too "
                                               r"large"):
        schedule_of_config(path, import_modules=False)


def test_a_model_module_that_exits_is_named_and_the_other_files_are_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "exiting_module.py").write_text("import sys\nsys.exit('exiting_module: needs a GPU')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "exiting_module", raising=False)
    exiting = _lightning_config(tmp_path, {"max_epochs": 4}, [{"start_epoch": 0}], {"class_path": "exiting_module.M"})
    fine = tmp_path / "ok.json"
    fine.write_text('{"train": {"epochs": 4}, "stage_schedule": [{"name": "a", "start_epoch": 0, "end_epoch": 2}]}')
    assert main(["validate", str(exiting), str(fine)]) == 2
    captured = capsys.readouterr()
    assert "cannot be imported (SystemExit: exiting_module: needs a GPU)" in captured.err
    assert captured.out.startswith(f"OK {fine}:")


def test_strings_the_parser_reads_as_numbers_pass_beside_a_value_it_refuses(tmp_path: Path) -> None:
    """LightningCLI reads "0" and "2" as the integers they are typed as; only `lambda_coef` = 'abc' is refused (the
    whole stage was left as written, so "0" and "2" were named too)."""
    pytest.importorskip("jsonargparse")
    path = _lightning_config(tmp_path, {"max_epochs": 4},
                             [{"name": "a", "start_epoch": "0", "end_epoch": "2", "lambda_coef": "abc"}])
    with pytest.raises(StageConfigError) as caught:
        schedule_of_config(path)
    assert [(p.field, p.value) for p in caught.value.problems] == [("lambda_coef", "abc")]
