"""Bootstrap intervals against cases small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from editstack.runner.stats import bootstrap_ci, paired_bootstrap_ci


def test_constant_values_give_a_zero_width_interval_at_the_value() -> None:
    low, high = bootstrap_ci([7.3] * 25, resamples=500, seed=3)
    assert low == high == pytest.approx(7.3)


def test_one_value_gives_the_value_as_its_interval() -> None:
    assert bootstrap_ci([4.0]) == (4.0, 4.0)


def test_tiny_sample_interval_matches_the_enumerated_bootstrap_distribution() -> None:
    # [0, 0, 0, 1]: a resample's mean is k/4 with k ~ Binomial(4, 1/4). P(mean = 0) = 81/256 > 2.5 %,
    # so the lower bound is 0; P(mean = 1) = 1/256 < 2.5 % but P(mean >= 0.75) = 13/256 > 2.5 %, so
    # the upper bound is 0.75.
    assert bootstrap_ci([0, 0, 0, 1], resamples=2000, seed=0) == (0.0, 0.75)
    # [0, 1]: means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: both tails reach the extremes
    assert bootstrap_ci([0, 1], resamples=2000, seed=0) == (0.0, 1.0)


def test_interval_narrows_with_a_lower_level_and_contains_the_mean() -> None:
    values = np.random.default_rng(1).uniform(0, 10, size=200)
    wide, narrow = bootstrap_ci(values, level=0.99), bootstrap_ci(values, level=0.5)
    assert wide[0] < narrow[0] < values.mean() < narrow[1] < wide[1]


def test_seeded_intervals_are_reproducible_and_the_seed_matters() -> None:
    values = list(np.random.default_rng(2).uniform(0, 10, size=50))
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)


def test_many_items_are_resampled_in_chunks_with_the_same_answer_each_time() -> None:
    values = np.random.default_rng(4).uniform(0, 10, size=3000)  # 2,000 x 3,000 draws: several chunks
    low, high = bootstrap_ci(values)
    assert (low, high) == bootstrap_ci(values)
    # the standard error of the mean of U(0, 10) over 3,000 items is about 0.053: +-1.96 of it
    assert high - low == pytest.approx(2 * 1.96 * 10 / np.sqrt(12 * 3000), rel=0.15)


def test_paired_interval_of_a_constant_shift_is_exactly_the_shift() -> None:
    a = [0.0, 2.5, 5.0, 7.25, 9.5]
    assert paired_bootstrap_ci(a, [x + 1 for x in a]) == (1.0, 1.0)
    assert paired_bootstrap_ci([x + 1 for x in a], a) == (-1.0, -1.0), "the difference is b - a"


def test_paired_interval_is_narrower_than_the_unpaired_spread_suggests() -> None:
    # item difficulty varies a lot, the shift little: pairing removes the difficulty
    rng = np.random.default_rng(7)
    a = rng.uniform(0, 10, size=100)
    b = a + 0.5 + rng.normal(0, 0.1, size=100)
    low, high = paired_bootstrap_ci(a, b)
    assert 0.45 < low < 0.5 < high < 0.55


@pytest.mark.parametrize(("call", "message"), [
    (lambda: bootstrap_ci([]), "non-empty"),
    (lambda: bootstrap_ci([1.0, float("nan")]), "finite"),
    (lambda: bootstrap_ci([1.0], resamples=0), "resamples"),
    (lambda: bootstrap_ci([1.0], level=1.0), "level"),
    (lambda: paired_bootstrap_ci([1.0, 2.0], [1.0]), "one length"),
])
def test_bad_input_is_refused_naming_the_argument(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
