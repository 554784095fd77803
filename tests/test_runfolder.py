"""The run folder's schema: records and manifests round-trip through their files, and what does not
fit is named by file, line and field; the journal tolerates a torn last line and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from editstack.errors import RunFolderError
from editstack.runner.config import RunConfig
from editstack.runner.runfolder import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    DatasetInfo,
    EditOutcome,
    Elapsed,
    Failure,
    ItemRecord,
    Journal,
    JudgeIdentity,
    Manifest,
    Reference,
    RunParams,
    read_manifest,
    write_manifest,
)
from editstack.wire.protocol import EditDefaults, Identity, Status, Verdict

VERDICT = Verdict(rubric_id="viescore", rubric_version="1", mode="logits", sub_scores={"a": 3.0, "b": 4.0}, sc=3.0,
                  pq=4.0, overall=12 ** 0.5, aggregation="overall = sqrt(sc * pq)", raw={"a": [0.5] * 2})


def _record(item_id: str = "x-1", **changes) -> ItemRecord:
    fields = dict(schema=SCHEMA_VERSION, id=item_id, category="物理", instruction="让球掉下来\u2028", language="zh",
                  sources=["/data/a.png"], references=[Reference(kind="text", value="the ball falls")],
                  metadata={"key": "1", "nested": {"k": [1, 2]}}, status="scored",
                  edit=EditOutcome(status="ok", path="edits/物理/x-1.png", seed=42), score=VERDICT,
                  notes=["source: converted RGBA to RGB"], elapsed=Elapsed(edit_s=1.5, score_s=0.25),
                  editor=Identity(model="m", revision="r", dtype="bfloat16", backend="diffusers/P"),
                  judge=JudgeIdentity(model="j", rubric_id="viescore", rubric_version="1", mode="logits"),
                  finished_at="2026-01-01T00:00:00+00:00")
    return ItemRecord(**(fields | changes))


def test_records_round_trip_through_the_journal_unchanged(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "results.jsonl")
    failed = _record("x-2", status="failed", score=None, judge=None,
                     error=Failure(stage="edit", code="model_error", message="boom", raw=["r"]))
    journal.append(_record())
    journal.append(failed)
    contents = journal.load()
    assert contents.records == {"x-1": _record(), "x-2": failed} and not contents.problems
    journal.rewrite([failed])
    assert journal.load().records == {"x-2": failed}


def test_manifest_round_trips_and_a_field_that_does_not_fit_is_named(tmp_path: Path) -> None:
    status = Status(service="editor", state="ready", model="m", devices=["cuda:0"],
                    edit_defaults=EditDefaults(steps=4, guidance=1.0, negative_prompt=" "))
    manifest = Manifest(schema=SCHEMA_VERSION, editstack_version="0.1.0", started_at="t0",
                        dataset=DatasetInfo(spec="sample", items=3), config=RunConfig(), editors=[status],
                        params=RunParams(seed=0, seed_rule="rule"))
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    data["dataset"]["items"] = "three"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(RunFolderError, match=r"manifest.json: Expected `int`, got `str` - at `\$.dataset.items`"):
        read_manifest(tmp_path)
    data["dataset"]["items"], data["schema"] = 3, SCHEMA_VERSION + 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(RunFolderError, match="schema version 2; this editstack reads version 1"):
        read_manifest(tmp_path)


def test_journal_lines_that_do_not_fit_are_named_by_line_and_field(tmp_path: Path) -> None:
    good = msgspec.to_builtins(_record())
    lines = [
        json.dumps(good),
        json.dumps(good | {"id": "bad-field", "category": 7}),
        json.dumps({k: v for k, v in good.items() if k != "schema"} | {"id": "no-schema"}),
        json.dumps(good | {"id": "scored-no-score", "score": None}),
        json.dumps(good | {"id": "bad-code", "status": "failed", "error": {"stage": "edit", "code": "oops", "message": "m"}}),
        '{"id": "not json',
        json.dumps(good | {"id": "last"}),
    ]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    contents = Journal(tmp_path / "results.jsonl").load()
    assert set(contents.records) == {"x-1", "last"} and not contents.torn_last_line
    assert contents.problems[0] == "results.jsonl line 2 (item 'bad-field'): Expected `str`, got `int` - at `$.category`"
    assert contents.problems[1] == "results.jsonl line 3 (item 'no-schema'): Object missing required field `schema`"
    assert "line 4 (item 'scored-no-score')" in contents.problems[2] and "score is null" in contents.problems[2]
    assert "line 5 (item 'bad-code')" in contents.problems[3] and "`$.error.code`" in contents.problems[3]
    assert contents.problems[4].startswith("results.jsonl line 6: not a JSON record")


def test_a_torn_last_line_is_dropped_and_the_rest_is_kept(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "results.jsonl")
    journal.append(_record("a"))
    with open(journal.path, "ab") as out:
        out.write(msgspec.json.encode(_record("b"))[:50])  # a crash mid-append
    contents = journal.load()
    assert list(contents.records) == ["a"] and contents.torn_last_line and not contents.problems


def test_a_journal_that_holds_exactly_its_records_is_not_rewritten_on_resume(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "results.jsonl")
    for item_id in ("a", "b"):
        journal.append(_record(item_id))

    def stamp() -> tuple[int, int]:  # a rewrite (temp file + rename) makes a new inode
        info = journal.path.stat()
        return info.st_ino, info.st_mtime_ns

    before = stamp()
    journal.rewrite(journal.load().records.values())
    assert stamp() == before
    journal.rewrite([_record("b")])  # a record dropped (a failed item to retry): rewritten
    assert stamp() != before and list(journal.load().records) == ["b"]
    with open(journal.path, "ab") as out:
        out.write(msgspec.json.encode(_record("c"))[:50])  # a crash mid-append
    journal.rewrite(journal.load().records.values())
    assert journal.path.read_bytes().endswith(b"\n") and not journal.load().torn_last_line, \
        "a torn last line goes, so the next append starts a line of its own"
    journal.append(_record("d"))
    assert list(journal.load().records) == ["b", "d"]


def test_a_scored_record_needs_finite_scores_and_a_failed_one_its_cause() -> None:
    with pytest.raises(ValueError, match="score is null"):
        _record(score=None)
    with pytest.raises(ValueError, match="score.overall is nan"):
        _record(score=msgspec.structs.replace(VERDICT, overall=float("nan")))
    with pytest.raises(ValueError, match="error is null"):
        _record(status="failed", score=None)
