"""Confidence intervals for means over items: the percentile bootstrap, plain and paired.

The reports and `editstack compare` put an interval on every mean they show, so a difference of a
tenth of a point over forty items is not read as a ranking. The bootstrap needs no assumption about
the scores' distribution (judge scores are bounded and often lumpy), and it is seeded: the same
values give the same interval on every machine and every rewrite of a report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
METHOD = "percentile bootstrap over items"
_DRAWS_PER_CHUNK = 1 << 20  # resample indices drawn at once: bounds memory to ~8 MiB for any item count


def bootstrap_ci(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float]:
    """The `level` percentile-bootstrap interval of the mean of `values`: resample the items with
    replacement `resamples` times and take the central `level` share of the resampled means.
    One value gives the interval (value, value): a single item shows no spread."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values: expected a non-empty list of numbers, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"values: every value must be finite, got {x[~np.isfinite(x)][0]}")
    if resamples < 1:
        raise ValueError(f"resamples: expected at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected between 0 and 1, got {level}")
    rng = np.random.default_rng(seed)
    # The chunk size depends on the item count only, so a given (values, resamples, seed) always
    # draws the same indices.
    rows = max(1, _DRAWS_PER_CHUNK // x.size)
    means = np.concatenate([x[rng.integers(0, x.size, size=(min(rows, resamples - start), x.size))].mean(axis=1)
                            for start in range(0, resamples, rows)])
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
                        level: float = LEVEL) -> tuple[float, float]:
    """The interval of mean(b - a) over paired values (a[i] and b[i] are one item): items are
    resampled as pairs, which is the bootstrap of the per-item differences."""
    if len(a) != len(b):
        raise ValueError(f"a and b: paired values must have one length, got {len(a)} and {len(b)}")
    differences = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return bootstrap_ci(differences, resamples=resamples, seed=seed, level=level)
