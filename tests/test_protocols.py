"""Each benchmark's table from a handful of verdicts, against figures computed by hand."""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest

from editstack.errors import ConfigError
from editstack.runner.config import ProtocolId, load_config
from editstack.runner.pipeline import run
from editstack.runner.protocols import PROTOCOLS, protocol_for, rise_item_score
from editstack.runner.runfolder import (RESULTS_NAME, SCHEMA_VERSION, EditOutcome, Failure, ItemRecord, Journal,
                                       read_manifest)
from editstack.wire.protocol import Verdict

from benchmark_layouts import gedit_row, imgedit_singleturn, kris_category, kris_entry, rise_data, rise_entry, write_image
from fakes import FakeScorerWorker, fake_services


def _record(item_id: str, category: str, sub_scores: dict[str, float] | None, *, language: str = "en",
            groups: tuple[str, ...] = (), metadata: dict | None = None, sc: float | None = None,
            pq: float | None = None, mode: str = "generate", raw: dict | None = None) -> ItemRecord:
    """A scored record with these sub-scores (overall their mean, or sqrt(sc * pq) given sc and pq),
    or a failed one (sub_scores None)."""
    verdict = None
    if sub_scores is not None:
        overall = math.sqrt(sc * pq) if sc is not None else sum(sub_scores.values()) / len(sub_scores)
        verdict = Verdict(rubric_id="r", rubric_version="1", mode=mode, sub_scores=sub_scores, sc=sc, pq=pq,
                          overall=overall, aggregation="by hand", raw=raw or {},
                          scale=(0, 10) if sc is not None else (1, 5))
    return ItemRecord(schema=SCHEMA_VERSION, id=item_id, category=category, instruction="do it", language=language,
                      sources=["/s.png"], groups=list(groups), metadata=metadata or {},
                      status="scored" if verdict else "failed", edit=EditOutcome(status="ok", path="e.png"),
                      score=verdict, error=None if verdict else Failure(stage="score", code="model_error", message="x"),
                      finished_at="2026-11-26T00:00:00+00:00")


def _rows(table) -> dict[str, list]:
    return {row[0]: row[1:] for row in table.rows}


def test_the_reader_chooses_the_protocol_and_others_get_viescore() -> None:
    assert [protocol_for(b) for b in ("gedit", "kris", "rise", "imgedit", "manifest", "sample", "hf")] == \
        ["gedit", "kris", "rise", "imgedit", "viescore", "viescore", "viescore"]
    assert {p.rubric for p in PROTOCOLS.values()} == {None, "viescore", "kris", "rise", "imgedit"}
    assert set(PROTOCOLS) == set(get_args(ProtocolId))  # the config's names are the protocols


def test_gedit_averages_the_task_types_not_the_items_per_language_and_subset() -> None:
    records = [
        _record("a1", "color_alter", {}, sc=8, pq=2, metadata={"Intersection_exist": True}),   # O = 4
        _record("a2", "color_alter", {}, sc=4, pq=4, metadata={"Intersection_exist": False}),  # O = 4
        _record("a3", "color_alter", {}, sc=9, pq=1, metadata={"Intersection_exist": True}),   # O = 3
        _record("b1", "subject-add", {}, sc=1, pq=9, metadata={"Intersection_exist": True}),   # O = 3
        _record("b2", "subject-add", None),                                                   # failed: no number
        _record("z1", "subject-add", {}, sc=10, pq=10, language="zh"),
    ]
    tables = {t.title: t for t in PROTOCOLS["gedit"].tables(records)}
    assert list(tables) == ["GEdit-Bench EN, full set", "GEdit-Bench EN, intersection subset", "GEdit-Bench CN, full set"]
    full = _rows(tables["GEdit-Bench EN, full set"])
    assert full["color_alter"] == pytest.approx([3, 3, 7, 7 / 3, 11 / 3])
    assert full["subject-add"] == pytest.approx([1, 2, 1, 9, 3])
    # by hand: the mean of the two task types' means, not of the four items
    assert full["average (of the task types)"] == pytest.approx([4, 5, (7 + 1) / 2, (7 / 3 + 9) / 2, (11 / 3 + 3) / 2])
    both = _rows(tables["GEdit-Bench EN, intersection subset"])
    assert both["color_alter"] == pytest.approx([2, 2, 8.5, 1.5, 3.5])
    assert _rows(tables["GEdit-Bench CN, full set"])["subject-add"] == pytest.approx([1, 1, 10, 10, 10])


def test_kris_pools_every_dimension_on_the_0_to_100_scale_by_category_group_and_type() -> None:
    plain = {"visual_consistency": 5, "visual_quality": 3, "instruction_following": 1}
    knowing = {"visual_consistency": 4, "visual_quality": 4, "instruction_following": 2, "knowledge_plausibility": 2}
    records = [
        _record("c1", "color_change", plain, groups=("factual", "attribute_perception")),
        _record("c2", "color_change", None, groups=("factual", "attribute_perception")),
        _record("p1", "physics", knowing, groups=("conceptual", "natural_science")),
    ]
    by_category, by_group, by_type = PROTOCOLS["kris"].tables(records)
    # color_change: VC (5-1)*25 = 100, VQ 50, IF 0, no KP; AVG = mean(100, 50, 0) = 50
    assert _rows(by_category)["color_change"] == pytest.approx([1, 2, 100, 50, 0, None, 50])
    assert _rows(by_category)["physics"] == pytest.approx([1, 1, 75, 75, 25, 25, 50])
    assert _rows(by_group)["natural_science"] == pytest.approx([1, 1, 75, 75, 25, 25, 50])
    # overall AVG pools the 3 + 4 values: (100 + 50 + 0 + 75 + 75 + 25 + 25) / 7
    overall = _rows(by_type)["overall"]
    assert overall[:2] == [2, 3] and overall[-1] == pytest.approx(350 / 7)
    assert overall[2:6] == pytest.approx([87.5, 62.5, 12.5, 25])
    assert _rows(by_type)["factual"][-1] == pytest.approx(50)


def test_rise_weighs_the_dimensions_halves_a_failed_reasoning_and_counts_full_marks_as_accurate() -> None:
    full = {"instruction_reasoning": 5, "appearance_consistency": 5, "visual_plausibility": 5}
    weak = {"instruction_reasoning": 1, "appearance_consistency": 5, "visual_plausibility": 4}
    free = {"instruction_reasoning": 4, "appearance_consistency": 1, "visual_plausibility": 5}
    logic = {"instruction_reasoning": 5, "appearance_consistency": 5, "visual_plausibility": 1}  # VP not counted
    records = [_record("t1", "temporal_reasoning", full), _record("t2", "temporal_reasoning", weak),
               _record("c1", "causal_reasoning", free, metadata={"consistency_free": True}),
               _record("l1", "logical_reasoning", logic), _record("l2", "logical_reasoning", None)]
    # by hand: weak = 0.3*5 + 0.5*1 + 0.2*4 = 2.8, halved as IR is 1 -> 1.4; free = 0.2*5 + 0.8*4 = 4.2;
    # logic = 0.3*5 + 0.7*5 = 5
    assert [rise_item_score(r) for r in records[:4]] == pytest.approx([5, 1.4, 4.2, 5])
    [table] = PROTOCOLS["rise"].tables(records)
    rows = _rows(table)
    assert rows["temporal_reasoning"] == pytest.approx([2, 2, 50, 25 * (3.2 - 1), 50, 100, 87.5])
    # causal's AC is free: accuracy needs IR and VP alone, and IR is 4
    assert rows["causal_reasoning"] == pytest.approx([1, 1, 0, 80, 75, None, 100])
    assert rows["logical_reasoning"] == pytest.approx([1, 2, 100, 100, 100, 100, None])
    # overall: 2 of 4 scored items accurate; score mean (5 + 1.4 + 4.2 + 5) / 4 = 3.9
    # VP of t1, t2 and c1: (5 + 4 + 5) / 3
    assert rows["overall"] == pytest.approx([4, 5, 50, 72.5, 25 * (15 / 4 - 1), 100, 25 * (14 / 3 - 1)])


def test_rise_accuracy_in_logits_mode_is_the_probability_of_full_marks_on_every_dimension() -> None:
    sub = {"instruction_reasoning": 4.5, "appearance_consistency": 4.8, "visual_plausibility": 4.9}
    raw = {"instruction_reasoning": [0, 0, 0.1, 0.3, 0.6], "appearance_consistency": [0, 0, 0, 0.2, 0.8],
           "visual_plausibility": [0, 0, 0, 0.1, 0.9]}
    [table] = PROTOCOLS["rise"].tables([_record("t", "temporal_reasoning", sub, mode="logits", raw=raw)])
    assert _rows(table)["temporal_reasoning"][2] == pytest.approx(100 * 0.6 * 0.8 * 0.9)


def test_imgedit_scores_an_item_as_the_mean_of_three_and_the_overall_as_the_mean_of_the_types() -> None:
    records = [_record("a1", "add", {"compliance": 5, "seamlessness": 4, "physical_detail": 3}),     # 4
               _record("a2", "add", {"compliance": 2, "seamlessness": 2, "physical_detail": 2}),     # 2
               _record("r1", "remove", {"compliance": 5, "seamlessness": 5, "physical_detail": 5}),  # 5
               _record("r2", "remove", None)]
    [table] = PROTOCOLS["imgedit"].tables(records)
    rows = _rows(table)
    assert rows["add"] == pytest.approx([2, 2, 3]) and rows["remove"] == pytest.approx([1, 2, 5])
    assert rows["overall (mean of the types)"] == pytest.approx([3, 4, 4])  # (3 + 5) / 2, not (4 + 2 + 5) / 3


# ---- runs on each benchmark's fixture, through the runner with fake services -------------------

@pytest.fixture
def fake() -> Iterator[tuple[FakeScorerWorker, dict[str, str]]]:
    folder = tempfile.mkdtemp(prefix="es-proto-", dir="/tmp")  # ipc paths must stay short
    worker = FakeScorerWorker()
    try:
        with fake_services(folder, scorer_worker=worker) as endpoints:
            yield worker, endpoints
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(tmp_path: Path, endpoints: dict[str, str], dataset: str) -> Path:
    config = load_config(None, {"dataset": dataset, "run_dir": str(tmp_path / "run"),
                                "editor.endpoints": [endpoints["editor"]], "scorer.endpoint": endpoints["scorer"],
                                "editor.deadline_s": 5, "scorer.deadline_s": 5})
    assert run(config) == 0
    return tmp_path / "run"


def test_a_kris_run_judges_knowledge_items_with_their_explanation_and_viewpoints_with_the_ground_truth(
        tmp_path, fake) -> None:
    worker, endpoints = fake
    root = tmp_path / "KRIS_Bench"
    kris_category(root, "physics", {"1": kris_entry("1.png", "Add a weight", explain="The heavier side goes down")})
    kris_category(root, "viewpoint_change", {"1": kris_entry("1.png", "Show it from above", gt_img="1_gt.png")})
    # KRIS-Bench's common script gives the judge neither a ground truth nor an explanation
    kris_category(root, "color_change", {"1": kris_entry("1.png", "Make it blue", gt_img="1_gt.png",
                                                          explain="Blue is a colour")})
    run_dir = _run(tmp_path, endpoints, str(root))
    physics, viewpoint, colour = (next(i for k, i in worker.items.items() if c in k)
                                  for c in ("physics", "viewpoint", "color"))
    assert physics.explanation == "The heavier side goes down" and not physics.references
    assert len(viewpoint.references) == 1 and not viewpoint.explanation
    assert not colour.references and not colour.explanation
    records = Journal(run_dir / RESULTS_NAME).load().records
    asked = {r.category: set(r.score.sub_scores) for r in records.values()}
    assert asked["physics"] == {"visual_consistency", "visual_quality", "instruction_following",
                                "knowledge_plausibility"}
    assert asked["viewpoint_change"] == asked["color_change"] == {"visual_consistency", "visual_quality",
                                                                  "instruction_following"}
    assert {r.score.rubric_id for r in records.values()} == {"kris"}
    assert read_manifest(run_dir).protocol == "kris"


def _gedit_fixture(folder: Path) -> Path:
    write_image(folder / "images" / "k1.png")
    rows = [gedit_row("k1"), gedit_row("k1", "cn"), gedit_row("k2", task_type="background_change", image="images/k1.png")]
    (folder / "gedit.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder / "gedit.jsonl"


def _kris_fixture(folder: Path) -> Path:
    kris_category(folder, "physics", {"1": kris_entry("1.png", "Add a weight", explain="It tilts")})
    kris_category(folder, "multi-element_composition", {"1": kris_entry(["a.png", "b.png"], "Put them together")})
    return folder


def _rise_fixture(folder: Path) -> Path:
    return rise_data(folder, [rise_entry("temporal_reasoning", 1, reference="Older."),
                              rise_entry("logical_reasoning", 2, reference_txt="Node 2.")])


def _imgedit_fixture(folder: Path) -> Path:
    imgedit_singleturn(folder, {"1": {"id": "animal/1.jpg", "prompt": "Make it smoother", "edit_type": "adjust"},
                                "2": {"id": "for_add/2.jpg", "prompt": "Add a lamp", "edit_type": "add"}})
    return folder


@pytest.mark.parametrize(("benchmark", "build", "titles", "judge"), [
    ("gedit", _gedit_fixture, ["GEdit-Bench EN, full set", "GEdit-Bench EN, intersection subset",
                               "GEdit-Bench CN, full set", "GEdit-Bench CN, intersection subset"], "GPT-4.1"),
    ("kris", _kris_fixture, ["KRIS-Bench by category", "KRIS-Bench by knowledge group",
                             "KRIS-Bench by knowledge type, and overall"], "GPT-4o"),
    ("rise", _rise_fixture, ["RISEBench"], "GPT-4.1"),
    ("imgedit", _imgedit_fixture, ["ImgEdit"], "GPT-4.1"),
])
def test_a_run_of_each_benchmark_writes_its_own_tables_with_its_judge_named(tmp_path, fake, benchmark, build,
                                                                            titles, judge) -> None:
    worker, endpoints = fake
    run_dir = _run(tmp_path, endpoints, str(build(tmp_path / benchmark)))
    assert read_manifest(run_dir).protocol == benchmark
    rubric = PROTOCOLS[benchmark].rubric
    records = Journal(run_dir / RESULTS_NAME).load().records.values()
    assert {r.score.rubric_id for r in records} == {rubric} and all(r.status == "scored" for r in records)
    tables = json.loads((run_dir / "benchmark.json").read_text())
    assert [t["title"] for t in tables] == titles
    # benchmark.csv holds the very numbers of benchmark.json, one per line
    with (run_dir / "benchmark.csv").open() as f:
        lines = list(csv.DictReader(f))
    expected = [(t["title"], str(row[0]), column, "" if value is None else str(value))
                for t in tables for row in t["rows"] for column, value in zip(t["columns"][1:], row[1:])]
    assert [(line["table"], line["row"], line["column"], line["value"]) for line in lines] == expected
    report = (run_dir / "report.md").read_text()
    assert all(f"## {title}" in report for title in titles)
    assert f"**Protocol**: {benchmark}: tables as the benchmark builds them. Its published table was judged by {judge}" \
        in report and "this run's judge is fake-judge" in report
    assert f"{rubric} 1 (sha256 " in report  # the rubric named with the hash of its text
    assert f"<h2>{titles[0]}</h2>" in (run_dir / "report.html").read_text()


def test_a_benchmark_protocol_refuses_another_rubric_before_anything_is_judged(tmp_path, fake) -> None:
    worker, endpoints = fake
    dataset = _imgedit_fixture(tmp_path / "imgedit")
    config = load_config(None, {"dataset": str(dataset), "run_dir": str(tmp_path / "run"),
                                "editor.endpoints": [endpoints["editor"]], "scorer.endpoint": endpoints["scorer"],
                                "scorer.rubric": "kris"})
    with pytest.raises(ConfigError, match="protocol 'imgedit' judges with its rubric 'imgedit', not 'kris'"):
        run(config)
    assert not worker.items and not (tmp_path / "run").exists()
