"""The rubric's arithmetic without a model: aggregation into a Verdict, and logits mode's answer
distribution where "10" is the two tokens "1", "0"."""

from __future__ import annotations

import math

import pytest

from editstack_scorer.rubric import answer_distribution, expected_score, load_rubric


def test_groups_take_their_minimum_and_overall_is_the_geometric_mean() -> None:
    rubric = load_rubric("viescore")
    subs = {"instruction_followed": 8.0, "not_over_edited": 6.0, "naturalness": 9.0, "no_artifacts": 4.0}
    verdict = rubric.result(mode="logits", sub_scores=subs, raw={})
    assert (verdict.sc, verdict.pq) == (6.0, 4.0)
    assert verdict.overall == pytest.approx(math.sqrt(24))
    assert (verdict.rubric_id, verdict.rubric_version) == ("viescore", "1")
    assert verdict.aggregation == ("sc = min(instruction_followed, not_over_edited); "
                                   "pq = min(naturalness, no_artifacts); overall = sqrt(sc * pq)")


@pytest.mark.parametrize(("subs", "message"), [
    ({"instruction_followed": 8.0}, "needs sub-scores"),
    ({"instruction_followed": 11.0, "not_over_edited": 6.0, "naturalness": 9.0, "no_artifacts": 4.0}, "outside 0..10"),
    ({"instruction_followed": math.nan, "not_over_edited": 6.0, "naturalness": 9.0, "no_artifacts": 4.0}, "outside"),
])
def test_missing_or_out_of_range_sub_scores_are_refused_not_aggregated(subs, message) -> None:
    with pytest.raises(ValueError, match=message):
        load_rubric("viescore").result(mode="logits", sub_scores=subs, raw={})


def test_ten_is_p_of_one_times_p_of_zero_after_one() -> None:
    first = [0.0] * 10
    first[1], first[7] = 0.5, 0.25  # P("1") = 0.5, P("7") = 0.25; 0.25 falls on non-score tokens
    dist, mass = answer_distribution(first, zero_after_one=0.6)
    assert mass == pytest.approx(0.75)
    assert dist[10] == pytest.approx(0.5 * 0.6 / 0.75)  # P(10) = P("1") * P("0" | "1"), renormalised
    assert dist[1] == pytest.approx(0.5 * 0.4 / 0.75)  # P(1) = P("1") * (1 - P("0" | "1"))
    assert dist[7] == pytest.approx(0.25 / 0.75) and sum(dist) == pytest.approx(1.0)
    assert expected_score(dist) == pytest.approx((1 * 0.2 + 7 * 0.25 + 10 * 0.3) / 0.75)


def test_a_judge_with_no_mass_on_the_answers_gives_an_error_not_a_score() -> None:
    with pytest.raises(ValueError, match="no probability"):
        answer_distribution([0.0] * 10, zero_after_one=0.5)
    with pytest.raises(ValueError, match="10 digits"):
        answer_distribution([0.1] * 9, zero_after_one=0.5)


def test_the_expected_score_stays_within_the_scale_despite_rounding() -> None:
    assert expected_score([0.0] * 10 + [1.0 + 1e-12]) == 10.0
