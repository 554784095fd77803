"""Each benchmark's table from a handful of verdicts, against figures computed by hand."""

from __future__ import annotations

import math

from typing import get_args

import pytest

from editstack.runner.config import ProtocolId
from editstack.runner.protocols import PROTOCOLS, protocol_for, rise_item_score
from editstack.runner.runfolder import SCHEMA_VERSION, EditOutcome, Failure, ItemRecord
from editstack.wire.protocol import Verdict


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
    records = [_record("t1", "temporal", full), _record("t2", "temporal", weak),
               _record("c1", "causal", free, metadata={"consistency_free": True}), _record("l1", "logical", logic),
               _record("l2", "logical", None)]
    # by hand: weak = 0.3*5 + 0.5*1 + 0.2*4 = 2.8, halved as IR is 1 -> 1.4; free = 0.2*5 + 0.8*4 = 4.2;
    # logic = 0.3*5 + 0.7*5 = 5
    assert [rise_item_score(r) for r in records[:4]] == pytest.approx([5, 1.4, 4.2, 5])
    [table] = PROTOCOLS["rise"].tables(records)
    rows = _rows(table)
    assert rows["temporal"] == pytest.approx([2, 2, 50, 25 * (3.2 - 1), 50, 100, 87.5])
    # causal's AC is free: accuracy needs IR and VP alone, and IR is 4
    assert rows["causal"] == pytest.approx([1, 1, 0, 80, 75, None, 100])
    assert rows["logical"] == pytest.approx([1, 2, 100, 100, 100, 100, None])
    # overall: 2 of 4 scored items accurate; score mean (5 + 1.4 + 4.2 + 5) / 4 = 3.9
    # VP of t1, t2 and c1: (5 + 4 + 5) / 3
    assert rows["overall"] == pytest.approx([4, 5, 50, 72.5, 25 * (15 / 4 - 1), 100, 25 * (14 / 3 - 1)])


def test_rise_accuracy_in_logits_mode_is_the_probability_of_full_marks_on_every_dimension() -> None:
    sub = {"instruction_reasoning": 4.5, "appearance_consistency": 4.8, "visual_plausibility": 4.9}
    raw = {"instruction_reasoning": [0, 0, 0.1, 0.3, 0.6], "appearance_consistency": [0, 0, 0, 0.2, 0.8],
           "visual_plausibility": [0, 0, 0, 0.1, 0.9]}
    [table] = PROTOCOLS["rise"].tables([_record("t", "temporal", sub, mode="logits", raw=raw)])
    assert _rows(table)["temporal"][2] == pytest.approx(100 * 0.6 * 0.8 * 0.9)


def test_imgedit_scores_an_item_as_the_mean_of_three_and_the_overall_as_the_mean_of_the_types() -> None:
    records = [_record("a1", "add", {"compliance": 5, "seamlessness": 4, "physical_detail": 3}),     # 4
               _record("a2", "add", {"compliance": 2, "seamlessness": 2, "physical_detail": 2}),     # 2
               _record("r1", "remove", {"compliance": 5, "seamlessness": 5, "physical_detail": 5}),  # 5
               _record("r2", "remove", None)]
    [table] = PROTOCOLS["imgedit"].tables(records)
    rows = _rows(table)
    assert rows["add"] == pytest.approx([2, 2, 3]) and rows["remove"] == pytest.approx([1, 2, 5])
    assert rows["overall (mean of the types)"] == pytest.approx([3, 4, 4])  # (3 + 5) / 2, not (4 + 2 + 5) / 3
