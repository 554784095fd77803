"""Run config loading and checking, in process: no services, no torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from editstack.errors import ConfigError
from editstack.runner.config import RunConfig, load_config


def _file(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_overrides_beat_the_file_and_the_file_beats_the_defaults(tmp_path) -> None:
    path = _file(tmp_path, {"limit": 3, "editor": {"items_per_request": 2}, "scorer": {"timeout_s": 30}})
    config = load_config(path, {"limit": 5, "editor.items_per_request": 8})
    assert config.limit == 5 and config.editor.items_per_request == 8  # override over file
    assert config.scorer.timeout_s == 30  # file over default
    assert config.scorer.items_per_request == RunConfig().scorer.items_per_request  # default kept


def test_an_empty_file_is_the_default_config(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path) == RunConfig() == load_config(None)


def test_the_documented_sample_config_loads() -> None:
    sample = Path(__file__).resolve().parents[1] / "shared" / "configs" / "sample.yaml"
    assert load_config(sample).run_dir == "runs/sample"


@pytest.mark.parametrize("data", [[1, 2], "just text", 7])
def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path, data) -> None:
    path = _file(tmp_path, data)
    with pytest.raises(ConfigError, match=f"^{re.escape(f'config {path}')}: the top level must be a mapping"):
        load_config(path)


def test_an_unknown_top_level_key_is_refused_naming_it(tmp_path) -> None:
    path = _file(tmp_path, {"colour": "blue"})
    with pytest.raises(ConfigError, match=f"^{re.escape(f'config {path}')}: .*`colour`"):
        load_config(path)


def test_an_unknown_nested_key_is_refused_naming_its_path(tmp_path) -> None:
    # the key's old name: a config written before the rename must fail, not silently use the default
    path = _file(tmp_path, {"scorer": {"batch_size": 2}})
    with pytest.raises(ConfigError, match=r"`batch_size` - at `\$\.scorer`"):
        load_config(path)


@pytest.mark.parametrize(("key", "value"), [
    ("editor.items_per_request", 0),
    ("scorer.items_per_request", 0),
    ("queue_batches", 0),
    ("editor.timeout_s", 0),
    ("scorer.timeout_s", -1.5),
    ("editor.deadline_s", 0),
    ("scorer.deadline_s", 0.0),
    ("editor.retries", -1),
    ("scorer.retries", -1),
    ("limit", -1),
    ("editor.steps", 0),
    ("editor.guidance", -0.5),
    ("editor.seed", -1),
])
def test_out_of_range_value_is_refused_naming_its_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=r"^config \(defaults\): .* - at " + re.escape(f"`$.{key}`") + "$"):
        load_config(None, {key: value})


@pytest.mark.parametrize(("key", "value"), [("editor.width", 0), ("editor.height", -64)])
def test_out_of_range_size_is_refused_naming_its_key(key: str, value: int) -> None:
    other = "editor.height" if key == "editor.width" else "editor.width"
    with pytest.raises(ConfigError, match=re.escape(f"- at `$.{key}`") + "$"):
        load_config(None, {key: value, other: 64})


def test_values_on_the_bounds_are_accepted() -> None:
    config = load_config(None, {
        "limit": 0, "editor.retries": 0, "scorer.retries": 0, "editor.guidance": 0, "editor.seed": 0,
        "editor.items_per_request": 1, "scorer.items_per_request": 1, "queue_batches": 1, "editor.steps": 1,
        "editor.width": 1, "editor.height": 1, "editor.timeout_s": 0.001, "scorer.deadline_s": 0.001,
    })
    assert (config.limit, config.editor.retries, config.editor.width) == (0, 0, 1)


def test_a_value_of_the_wrong_type_is_refused_naming_its_key() -> None:
    with pytest.raises(ConfigError, match=r"- at `\$\.editor\.items_per_request`$"):
        load_config(None, {"editor.items_per_request": "four"})


@pytest.mark.parametrize(("given", "missing"), [("editor.width", "height"), ("editor.height", "width")])
def test_width_without_height_is_refused_naming_both_keys(given: str, missing: str) -> None:
    with pytest.raises(ConfigError, match=r"^config \(defaults\): editor\.width and editor\.height") as caught:
        load_config(None, {given: 512})
    assert f"{missing}=None" in str(caught.value)


def test_only_score_without_edits_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^config \(defaults\): only=score needs edits"):
        load_config(None, {"only": "score"})
    assert load_config(None, {"only": "score", "edits": "runs/old"}).edits == "runs/old"


@pytest.mark.parametrize(("key", "value", "named"), [
    ("scorer.endpoint", "localhost:5555", "scorer.endpoint"),
    ("editor.endpoints", ["ipc:///tmp/a.sock", "http://b:80"], "editor.endpoints[1]"),
])
def test_a_bad_endpoint_is_refused_naming_its_key_and_value(key: str, value: object, named: str) -> None:
    bad = value if isinstance(value, str) else value[-1]
    with pytest.raises(ConfigError, match="^" + re.escape(f"config (defaults): {named}: endpoint '{bad}' must start")):
        load_config(None, {key: value})


def test_an_empty_editor_list_is_refused_unless_only_scoring() -> None:
    with pytest.raises(ConfigError, match=r"editor\.endpoints is empty"):
        load_config(None, {"editor.endpoints": []})
    assert load_config(None, {"editor.endpoints": [], "only": "score", "edits": "runs/old"}).editor.endpoints == []


def test_an_unreadable_yaml_file_is_refused_naming_the_file(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("editor: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(f'config {path}')}: "):
        load_config(path)
