"""Reading config files: JSON (with the seed's // comments) and YAML, and errors that name file and line."""

import json
import re

import pytest

from lightning_stages import StageConfigError, StageSchedule
from lightning_stages.schedule.seed_format import load_config, parse_json

CONFIG = {
    "dataset": {"root": "/data"},
    "train": {"epochs": 30, "loss_weights": {"bce": 1.0, "focal": 15}},
    "distillation": {"enable": False, "lambda_coef": 0.5},
    "stage_schedule": [
        {"name": "kd", "start_epoch": 0, "end_epoch": 10, "distillation": True},
        {"name": "ft", "start_epoch": 10, "loss_weights": {"focal": 1}},
    ],
}

CONFIG_YAML = """\
dataset:
  root: /data
train:
  epochs: 30
  loss_weights: {bce: 1.0, focal: 15}
distillation:
  enable: false
  lambda_coef: 0.5
stage_schedule:
  - name: kd
    start_epoch: 0
    end_epoch: 10
    distillation: true
  - name: ft
    start_epoch: 10
    loss_weights:
      focal: 1
"""


def test_load_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG, indent=2))
    assert load_config(path) == CONFIG
    assert load_config(str(path)) == CONFIG


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_load_yaml(tmp_path, suffix):
    path = tmp_path / f"config{suffix}"
    path.write_text(CONFIG_YAML)
    assert load_config(path) == CONFIG


def test_json_and_yaml_give_the_same_schedule(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(CONFIG))
    (tmp_path / "c.yaml").write_text(CONFIG_YAML)
    from_json = StageSchedule.from_config(tmp_path / "c.json")
    from_yaml = StageSchedule.from_config(str(tmp_path / "c.yaml"))
    assert from_json == from_yaml == StageSchedule.from_config(CONFIG)
    assert from_json.at(12).loss_weights == {"bce": 1.0, "focal": 1.0}


def test_json_comments_are_allowed(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        '// a config\n'
        '{\n'
        '  "url": "http://example.com/a//b", // a // inside a string is kept\n'
        '  /* a block\n'
        '     comment */ "n": 1,\n'
        '  "s": "quote \\" then // not a comment"\n'
        '}\n'
    )
    assert load_config(path) == {"url": "http://example.com/a//b", "n": 1, "s": 'quote " then // not a comment'}


def test_plain_json_and_json_with_comments_read_alike():
    plain = '{"a": [1, 2.5, "x//y"], "b": {"c": null, "d": true}}'
    commented = '{"a": [1, 2.5, "x//y"], // the list\n "b": /* block */ {"c": null, "d": true}}'
    expected = {"a": [1, 2.5, "x//y"], "b": {"c": None, "d": True}}
    assert parse_json(plain) == parse_json(commented) == json.loads(plain) == expected


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ('{\n  /* two\n     lines */\n  "a": 1\n  "b": 2\n}\n', 5, 3),  # a missing comma after a block comment
        ('{"a": 1, // fine\n "b": }', 2, 7),  # a value missing in JSON with comments
        ('{"a": 1,\n "b": 2', 2, 8),  # unterminated
    ],
)
def test_json_errors_name_file_line_and_column(tmp_path, text, line, column):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(StageConfigError, match=re.escape(f"{path}:{line}:{column}: not valid JSON")):
        load_config(path)


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    # line 5 lacks a comma; the block comment before it must not shift the line number
    path.write_text('{\n  /* two\n     lines */\n  "a": 1\n  "b": 2\n}\n')
    with pytest.raises(StageConfigError, match=re.escape(f"{path}:5:") + ".*not valid JSON"):
        load_config(path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: 3\nstage_schedule:\n  - start_epoch: 0\n    end_epoch: [1\n")
    with pytest.raises(StageConfigError, match=re.escape(str(path)) + r":\d+:\d+: not valid YAML") as info:
        load_config(path)
    line = int(re.search(re.escape(str(path)) + r":(\d+):", str(info.value)).group(1))
    assert line >= 5  # the unclosed bracket opens on line 5; the parser notices it there or later


def test_invalid_yaml_through_from_config(tmp_path):
    path = tmp_path / "tabs.yml"
    path.write_text("train:\n\tepochs: 3\n")
    with pytest.raises(StageConfigError, match=re.escape(f"{path}:2:")):
        StageSchedule.from_config(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(StageConfigError, match=r"cannot read config file .*nope\.json"):
        load_config(path)
    with pytest.raises(StageConfigError, match=r"nope\.json"):
        StageSchedule.from_config(str(path))


@pytest.mark.parametrize(("name", "text", "kind"), [("list.json", "[1, 2]", "list"), ("s.yaml", "just text", "str")])
def test_root_must_be_a_mapping(tmp_path, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(StageConfigError, match=f"the root of a config must be a mapping, not {kind}"):
        load_config(path)


def test_empty_yaml_is_an_empty_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert load_config(path) == {}
    schedule = StageSchedule.from_config(path)
    assert schedule.stages == ()
    assert schedule.at(0).is_base
