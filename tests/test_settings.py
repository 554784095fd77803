"""Service settings from the environment: typed, an empty variable meaning the default, a misspelt
name reported with the closest setting, a bad value named with its variable; compose passing every
setting to its container; the services stopping on a bad value with one line and status 2."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from editstack.errors import SettingsError
from editstack.service.settings import settings_from_env
from editstack_scorer.settings import ScorerSettings

from conftest import service_python

ROOT = Path(__file__).resolve().parents[1]


def _scorer_settings(environ: dict[str, str]) -> ScorerSettings:
    return settings_from_env(ScorerSettings, "SCORER_", environ)


def test_settings_are_read_typed_from_their_prefixed_variables_only() -> None:
    settings = _scorer_settings({"SCORER_MAX_NEW_TOKENS": "64", "SCORER_MODE": "generate", "SCORER_MAX_BATCH": "8",
                                 "EDITOR_MAX_BATCH": "2", "MAX_BATCH": "3"})
    assert settings.max_new_tokens == 64 and settings.mode == "generate" and settings.limits.max_batch == 8


def test_an_empty_variable_means_the_default_as_an_unset_one_does() -> None:
    empty = {f"SCORER_{name.upper()}": "" for name in ScorerSettings.__struct_fields__}
    assert _scorer_settings(empty) == ScorerSettings()


def test_each_misspelt_setting_is_reported_once_with_the_closest_name(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="editstack.service.settings"):
        settings = _scorer_settings({"SCORER_MAX_NEW_TOKEN": "64", "SCORER_BATCHSIZE": "2", "SCORER_COLOUR": "red"})
    assert settings == ScorerSettings()
    assert caplog.messages == [
        "SCORER_BATCHSIZE is not a setting, ignored (did you mean SCORER_BATCH_SIZE?)",
        "SCORER_COLOUR is not a setting, ignored",
        "SCORER_MAX_NEW_TOKEN is not a setting, ignored (did you mean SCORER_MAX_NEW_TOKENS?)",
    ]


def test_names_of_the_runner_of_compose_and_of_the_other_service_are_not_reported(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="editstack.service.settings"):
        _scorer_settings({"EDITSTACK_RUN": "sample", "EDITSTACK_SCORER_VENV": ".venvs/scorer", "SCORER_GPU_IDS": "1",
                          "EDITOR_STEP": "40", "SCORER_MODEL": "embedded-tiny"})
    assert caplog.messages == []


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("SCORER_BATCH_SIZE", "abc", "SCORER_BATCH_SIZE='abc': expected `int`"),
    ("SCORER_MAX_IMAGE_PX", "4096x4096", "SCORER_MAX_IMAGE_PX='4096x4096': expected `int`"),
    ("SCORER_MODE", "best", "SCORER_MODE='best': expected one of 'generate', 'logits'"),
])
def test_a_bad_value_is_an_error_naming_the_variable_and_the_value(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as error:
        _scorer_settings({variable: value})
    assert str(error.value) == message


@pytest.mark.parametrize("service", ["editor", "scorer"])
def test_compose_passes_every_setting_to_its_service(service: str) -> None:
    # the service's own interpreter: the editor's package is not in the test environment
    fields = subprocess.run([service_python(service), "-c", f"from editstack_{service}.settings import "
                             f"{service.title()}Settings as S; print(*S.__struct_fields__)"],
                            capture_output=True, text=True, check=True, timeout=60).stdout.split()
    environment = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"][service]["environment"]
    # the tiny model's folder is the image's own (its Dockerfile sets it)
    expected = {f"{service.upper()}_{name.upper()}" for name in fields} - {f"{service.upper()}_TINY_DIR"}
    assert expected <= environment.keys()
    assert {"HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"} <= environment.keys()


@pytest.mark.parametrize(("service", "variable", "value", "line"), [
    ("editor", "EDITOR_STEPS", "abc", "editor: EDITOR_STEPS='abc': expected `int`"),
    ("scorer", "SCORER_RUBRIC", "nope",
     "scorer: SCORER_RUBRIC='nope': unknown rubric 'nope'; known rubrics: imgedit, kris, rise, viescore"),
    ("editor", "EDITOR_DEVICES", ",", "editor: EDITOR_DEVICES=',' lists no device (e.g. cuda:0,cuda:1 or cpu)"),
    ("scorer", "SCORER_DEVICES", " , ", "scorer: SCORER_DEVICES=' , ' lists no device (e.g. cuda:0,cuda:1 or cpu)"),
    ("scorer", "SCORER_DEVICE", "cuda:0", "scorer: SCORER_DEVICE is now SCORER_DEVICES; set that instead"),
])
def test_a_service_with_a_bad_setting_exits_2_with_one_line(service: str, variable: str, value: str,
                                                            line: str) -> None:
    env = {name: text for name, text in os.environ.items() if not name.startswith(("EDITOR_", "SCORER_"))}
    result = subprocess.run([service_python(service), "-m", f"editstack_{service}"], env={**env, variable: value},
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr.splitlines(), result.stdout) == (2, [line], "")


def test_the_editor_reports_a_misspelt_setting_at_start(start_service) -> None:
    editor = start_service("editor", [service_python("editor"), "-m", "editstack_editor"],
                           env={"EDITOR_MODEL": "identity", "EDITOR_STEP": "40"})
    editor.stop()
    assert "EDITOR_STEP is not a setting, ignored (did you mean EDITOR_STEPS?)" in editor.tail()
