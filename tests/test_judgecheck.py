"""Checking the judge: the pixel-checked cases, the accuracy arithmetic, and one run against the real
scorer on its tiny judge."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from editstack.errors import ConfigError
from editstack.runner import judgecheck
from editstack.runner.judgecheck import (
    EDIT_TYPES,
    QUALITY,
    accuracy,
    accuracy_rows,
    baseline_rows,
    build_cases,
    pixel_check,
    run_judgecheck,
)
from editstack.runner.report import TINY_BANNER
from editstack.wire.protocol import ScoreDefaults, Status, Verdict

from conftest import service_python


def test_every_right_answer_passes_its_pixel_check_and_every_other_candidate_fails() -> None:
    cases = build_cases(cases_per_type=3, seed=5)
    assert sorted({c.edit_type for c in cases}) == sorted((*EDIT_TYPES, QUALITY)) and len(cases) == 12
    for case in cases:
        expected = ({"clean", "degraded"} if case.edit_type == QUALITY else {"correct", "wrong", "over_edit", "noop"})
        assert set(case.candidates) == expected
        for role, image in case.candidates.items():
            assert image.shape == (128, 128, 3) and image.dtype == np.uint8
            assert (pixel_check(case, image) == []) == (role in ("correct", "clean")), case.item_id(role)
        if "noop" in case.candidates:
            assert case.candidates["noop"] is case.source


def test_cases_are_the_same_for_a_seed_and_differ_across_seeds() -> None:
    first, again, other = build_cases(2, seed=1), build_cases(2, seed=1), build_cases(2, seed=2)
    for a, b, c in zip(first, again, other, strict=True):
        assert a.instruction == b.instruction and np.array_equal(a.source, b.source)
        assert all(np.array_equal(a.candidates[r], b.candidates[r]) for r in a.candidates)
        assert not np.array_equal(a.source, c.source)


def test_a_wrong_answer_that_passes_its_pixel_check_is_refused_when_the_cases_are_built(monkeypatch) -> None:
    monkeypatch.setattr(judgecheck, "_degrade", lambda image, rng: image.copy())  # "degraded" = clean
    with pytest.raises(ValueError, match="case quality-0-degraded: a wrong answer passes the pixel check"):
        build_cases(1)
    with pytest.raises(ConfigError, match="cases_per_type: expected at least 1, got 0"):
        build_cases(0)


def test_accuracy_counts_strict_wins_and_keeps_ties_apart() -> None:
    result = accuracy([(5.0, 3.0), (5.0, 5.0), (2.0, 4.0), (7.0, 1.0)])
    assert (result.pairs, result.higher, result.ties, result.lower, result.share) == (4, 2, 1, 1, 0.5)
    assert 0.0 <= result.ci_low < 0.5 < result.ci_high <= 1.0
    perfect = accuracy([(9.0, 1.0)] * 5)
    assert (perfect.share, perfect.ci_low, perfect.ci_high) == (1.0, 1.0, 1.0)
    assert accuracy([(3.0, 3.0 + 1e-12)]).ties == 1  # within the tie tolerance
    assert accuracy([]) == judgecheck.Accuracy(0, 0, 0, 0, None, None, None)


def _verdict(sc: float, pq: float, overall: float) -> Verdict:
    return Verdict(rubric_id="viescore", rubric_version="1", mode="logits", sub_scores={}, sc=sc, pq=pq,
                   overall=overall, aggregation="overall = sqrt(sc * pq)")


def test_pairs_with_a_failed_member_are_left_out_and_the_failure_is_listed() -> None:
    cases = build_cases(2)
    verdicts = {}
    for case in cases:
        for role in case.candidates:
            good = role in ("correct", "clean")
            verdicts[case.item_id(role)] = _verdict(8.0 if good else 2.0, 9.0 if good else 1.0, 8.0 if good else 2.0)
    verdicts["color-0-noop"] = _verdict(8.0, 9.0, 1.0)  # a tie on sc, lower on overall
    del verdicts["add-1-wrong"]
    rows = {(r.edit_type, r.dimension, r.other): r.accuracy for r in accuracy_rows(cases, verdicts)}
    assert len(rows) == 3 * 6 + 2
    assert (rows["color", "sc", "noop"].higher, rows["color", "sc", "noop"].ties) == (1, 1)
    assert rows["color", "overall", "noop"].share == 1.0
    assert rows["add", "sc", "wrong"].pairs == 1 and rows["add", "sc", "over_edit"].pairs == 2
    assert rows[QUALITY, "pq", "degraded"].share == 1.0
    color = baseline_rows(cases, verdicts)[0]
    assert (color.noop_items, color.noop_sc, color.noop_overall, color.correct_overall) == (2, 5.0, 1.5, 8.0)

    status = Status(service="scorer", state="ready", model="judge", embedded_tiny=False,
                    score_defaults=ScoreDefaults(mode="logits", rubric_id="viescore", rubric_version="1",
                                                 aggregation="overall = sqrt(sc * pq)"))
    failure = judgecheck._Failure("add-1-wrong", "model_error", "CUDA out | of memory")
    summary = judgecheck._summary(status, cases, verdicts, [failure], mode=None, rubric=None, cases_per_type=2, seed=0)
    text = judgecheck._markdown(summary)
    assert summary["items"] == {"sent": 28, "scored": 27, "failed": 1}
    assert "## Failed items (1)" in text and "| add-1-wrong | model_error | CUDA out \\| of memory |" in text
    assert TINY_BANNER not in text


@pytest.mark.parametrize(("arguments", "message"), [
    ({"endpoint": "localhost:5555"}, "endpoint: endpoint 'localhost:5555' must start with ipc:// or tcp://"),
    ({"mode": "vibes"}, "mode: expected one of logits, generate, got 'vibes'"),
    ({"timeout_s": 0}, "timeout_s: expected a positive number of seconds, got 0"),
    ({"cases_per_type": 0}, "cases_per_type: expected at least 1, got 0"),
])
def test_bad_arguments_are_refused_before_anything_is_sent(tmp_path, arguments, message) -> None:
    arguments = {"endpoint": "ipc:///nonexistent/scorer.sock", **arguments}
    with pytest.raises(ConfigError, match=message):
        run_judgecheck(arguments.pop("endpoint"), tmp_path, **arguments)
    assert not any(tmp_path.iterdir())


def test_a_check_of_the_tiny_judge_fills_every_table_and_says_it_is_near_chance(start_service, tiny_judge_dir,
                                                                                tmp_path) -> None:
    service = start_service("scorer", [service_python("scorer"), "-m", "editstack_scorer"],
                            env={"SCORER_TINY_DIR": str(tiny_judge_dir)})
    started = time.monotonic()
    markdown = run_judgecheck(service.endpoint, tmp_path / "check", cases_per_type=2, timeout_s=120)
    elapsed_s = time.monotonic() - started
    assert markdown == tmp_path / "check" / "judgecheck.md" and elapsed_s < 60

    summary = json.loads((tmp_path / "check" / "judgecheck.json").read_text())
    assert summary["items"] == {"sent": 28, "scored": 28, "failed": 0} and summary["failed"] == []
    assert summary["judge"]["embedded_tiny"] and summary["judge"]["backend"].startswith("transformers/")
    assert summary["judge"]["rubric"] == ["viescore 1"] and summary["judge"]["mode"] == ["logits"]
    assert len(summary["accuracy"]) == 20
    for row in summary["accuracy"]:
        assert row["pairs"] == 2 and row["higher"] + row["ties"] + row["lower"] == 2
        assert row["ci_low"] <= row["share"] <= row["ci_high"]
    assert all(row["noop_items"] == 2 and row["noop_overall"] is not None for row in summary["noop_baseline"])

    text = markdown.read_text()
    assert TINY_BANNER in text and "near chance (50 %) by construction" in text
    assert "Failed items" not in text and "| – |" not in text
    assert text.count("| color |") == 6 + 1 + 1 and text.count(f"| {QUALITY} |") == 2 + 1
