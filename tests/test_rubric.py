"""The rubric's arithmetic without a model: aggregation into a Verdict, and logits mode's answer
distribution where "10" is the two tokens "1", "0"."""

from __future__ import annotations

import hashlib
import math
import re

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


def test_on_a_one_to_five_scale_the_answers_are_the_digits_one_to_five_and_nothing_else() -> None:
    first = [0.0] * 10
    first[0], first[1], first[3], first[5], first[9] = 0.1, 0.2, 0.3, 0.1, 0.2  # "0" and "9" are no answers
    dist, mass = answer_distribution(first, zero_after_one=0.9, scale=(1, 5))  # "10" is no answer either
    assert mass == pytest.approx(0.6)
    assert dist == pytest.approx([0.2 / 0.6, 0.0, 0.3 / 0.6, 0.0, 0.1 / 0.6])
    # by hand: (1 * 0.2 + 3 * 0.3 + 5 * 0.1) / 0.6 = 1.6 / 0.6
    assert expected_score(dist, (1, 5)) == pytest.approx(1.6 / 0.6)
    assert expected_score([0.0, 0.0, 0.0, 0.0, 1.0 + 1e-12], (1, 5)) == 5.0
    with pytest.raises(ValueError, match="no probability on the answers 1..5"):
        answer_distribution([0.5] + [0.0] * 5 + [0.5] * 4, zero_after_one=0.0, scale=(1, 5))


_OWN_RUBRIC = '''
id = "mine"
version = "7"
description = "two 1-5 dimensions, one only for items with an explanation"
system = "You judge edits."
scale = [1, 5]
aggregation_rule = "mean"

[groups.edit]
title = "the edit"
images = ["source", "edited"]
prompt = """Rate "follows" for: $instruction"""

[groups.knowledge]
title = "knowledge"
images = ["edited"]
needs = ["explanation"]
prompt = """Given $explanation, rate "plausible"."""

[[questions]]
name = "follows"
group = "edit"
prompt = "Does it follow $instruction? 1-5"

[[questions]]
name = "plausible"
group = "knowledge"
prompt = "Is it plausible given $explanation? 1-5"
'''


def test_a_users_rubric_file_is_loaded_by_id_hashed_and_asks_a_group_only_of_items_that_have_what_it_needs(
        tmp_path) -> None:
    (tmp_path / "mine.toml").write_text(_OWN_RUBRIC)
    rubric = load_rubric("mine", str(tmp_path))
    assert rubric.sha256 == hashlib.sha256(_OWN_RUBRIC.encode()).hexdigest()
    assert rubric.asked(set()) == ("edit",) and rubric.asked({"explanation"}) == ("edit", "knowledge")
    plain = rubric.result(mode="generate", sub_scores={"follows": 4.0}, raw={}, asked=("edit",))
    assert (plain.overall, plain.sc, plain.pq, plain.scale) == (4.0, None, None, (1, 5))
    both = rubric.result(mode="generate", sub_scores={"follows": 4.0, "plausible": 1.0}, raw={},
                         asked=("edit", "knowledge"))
    assert both.overall == 2.5 and both.rubric_sha256 == rubric.sha256
    with pytest.raises(ValueError, match=r"outside 1..5"):
        rubric.result(mode="generate", sub_scores={"follows": 0.0}, raw={}, asked=("edit",))


@pytest.mark.parametrize(("change", "message"), [
    (("scale = [1, 5]", "scale = [2, 5]"), "scale must run from 0 or 1"),
    (('needs = ["explanation"]\n', ""), "placeholders ['instruction']"),
    (('images = ["edited"]', 'images = ["edited", "reference"]'), "must need reference_image"),
])
def test_a_users_rubric_that_breaks_a_rule_is_refused_naming_the_file(tmp_path, change, message) -> None:
    (tmp_path / "mine.toml").write_text(_OWN_RUBRIC.replace(*change))
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        load_rubric("mine", str(tmp_path))
    assert str(tmp_path / "mine.toml") in str(refused.value)
