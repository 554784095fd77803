"""The runner against in-process fake services (the real transport, model-free workers): the records
it writes, their schema and provenance, failures kept apart from scores, and resume. Each test takes
a fraction of a second; test_runner.py runs the same paths against the real services."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from editstack.runner.config import load_config
from editstack.runner.pipeline import run
from editstack.runner.runfolder import RESULTS_NAME, SCHEMA_VERSION, Journal, read_manifest

from fakes import FAIL_MARK, FAKE_AGGREGATION, fake_sc, fake_services


@pytest.fixture
def services() -> Iterator[dict[str, str]]:
    folder = tempfile.mkdtemp(prefix="es-fake-", dir="/tmp")  # ipc paths must stay short
    with fake_services(folder) as endpoints:
        yield endpoints
    shutil.rmtree(folder, ignore_errors=True)


def _dataset(folder: Path, instructions: dict[str, str]) -> Path:
    """A manifest of 32x32 items, one per (id, instruction), in two categories."""
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "red.png")
    lines = [json.dumps({"id": item_id, "category": "even" if n % 2 == 0 else "odd", "instruction": instruction,
                         "source": "red.png", "reference": "red.png", "metadata": {"n": n}})
             for n, (item_id, instruction) in enumerate(instructions.items())]
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def _config(tmp_path: Path, services: dict[str, str], dataset: Path, **overrides):
    return load_config(None, {"dataset": str(dataset), "run_dir": str(tmp_path / "run"),
                              "editor.endpoints": [services["editor"]], "scorer.endpoint": services["scorer"],
                              "editor.items_per_request": 3, "scorer.items_per_request": 2,
                              "editor.deadline_s": 5, "scorer.deadline_s": 5, **overrides})


def test_every_record_carries_the_schema_version_and_both_identities(tmp_path, services) -> None:
    dataset = _dataset(tmp_path / "data", {f"item-{n}": "make it blue" for n in range(7)})
    assert run(_config(tmp_path, services, dataset)) == 0
    contents = Journal(tmp_path / "run" / RESULTS_NAME).load()
    assert not contents.problems and len(contents.records) == 7
    for record in contents.records.values():
        assert record.schema == SCHEMA_VERSION and record.status == "scored" and record.error is None
        assert record.score.sc == fake_sc(record.id) and record.score.aggregation == FAKE_AGGREGATION
        assert (record.editor.model, record.editor.backend) == ("echo", "echo")
        assert (record.judge.model, record.judge.rubric_id, record.judge.rubric_version) == ("fake-judge", "fake", "1")
        assert record.references[0].kind == "image" and record.metadata["n"] in range(7)
        assert (tmp_path / "run" / record.edit.path).is_file()
    manifest = read_manifest(tmp_path / "run")
    assert manifest.counts.scored == 7 and manifest.rubric.id == "fake"
    assert manifest.params.steps == 4 and "steps" in manifest.params.from_editor_defaults
    assert (tmp_path / "run" / "report.md").is_file()


def test_a_judge_failure_is_recorded_with_its_stage_and_code_never_as_a_score(tmp_path, services) -> None:
    dataset = _dataset(tmp_path / "data", {"good": "make it blue", "bad": f"please {FAIL_MARK}"})
    assert run(_config(tmp_path, services, dataset)) == 1
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    bad = records["bad"]
    assert bad.status == "failed" and bad.score is None
    assert (bad.error.stage, bad.error.code) == ("score", "model_error") and "fake failure" in bad.error.message
    assert bad.judge.model == "fake-judge", "a failed item still names the judge that failed it"
    assert records["good"].status == "scored"


def test_resume_retries_failed_items_and_keeps_each_item_once(tmp_path, services) -> None:
    dataset = _dataset(tmp_path / "data", {"a": "make it blue", "b": f"please {FAIL_MARK}", "c": "add a cat"})
    assert run(_config(tmp_path, services, dataset)) == 1
    lines_before = (tmp_path / "run" / RESULTS_NAME).read_bytes().count(b"\n")
    # the item is fixed in the dataset: the resume retries it alone, and keeps the complete ones
    dataset.write_text(dataset.read_text().replace(FAIL_MARK, "be fine"))
    assert run(_config(tmp_path, services, dataset)) == 0
    lines = (tmp_path / "run" / RESULTS_NAME).read_bytes().split(b"\n")
    records = Journal(tmp_path / "run" / RESULTS_NAME).load().records
    assert lines_before == 3 and len([line for line in lines if line]) == 3
    assert {r.id: r.status for r in records.values()} == {"a": "scored", "b": "scored", "c": "scored"}
