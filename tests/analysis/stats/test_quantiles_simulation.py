"""Seeded simulations: anytime validity and power of the quantile CSs and the guardrail.

Monte-Carlo checks, not golden values: error rates over many looks must stay at or below alpha
(within three Monte-Carlo standard errors), and a clear regression must be caught.
"""

import math

import numpy as np
import pytest

from analysis.stats.quantiles import QuantileMethod, quantile_cs_ranks, quantile_guardrail
from routing.observe.histogram import LogHistogram

SEED = 20240601


def monte_carlo_ceiling(alpha: float, replications: int) -> float:
    """alpha plus three binomial standard errors."""
    return alpha + 3.0 * math.sqrt(alpha * (1.0 - alpha) / replications)


@pytest.mark.parametrize(
    ("p", "alpha", "one_sided", "method"),
    [
        (0.95, 0.1, True, "beta_binomial"),
        (0.5, 0.1, False, "beta_binomial"),
        (0.9, 0.1, False, "stitching"),
    ],
)
def test_cs_misses_the_true_quantile_at_some_time_with_probability_at_most_alpha(
    p: float, alpha: float, one_sided: bool, method: QuantileMethod
) -> None:
    # Distribution-free: X_(k) < Q(p) exactly when at least k observations fall below Q(p), and
    # that count is Binomial(t, p) for any continuous distribution. So simulate the count
    # directly and check the CS at every t = 1..horizon, i.e. under continuous monitoring.
    replications, horizon = 2_000, 1_500
    rng = np.random.default_rng(SEED)
    below_quantile = np.cumsum(rng.random((replications, horizon)) < p, axis=1, dtype=np.int32)
    ranks = np.array(
        [
            quantile_cs_ranks(t, p, alpha=alpha, t_opt=300, one_sided=one_sided, method=method)
            for t in range(1, horizon + 1)
        ]
    )
    lower_ranks, upper_ranks = ranks[:, 0], ranks[:, 1]
    # Upper bound X_(k_hi) below Q(p): at least k_hi observations below Q(p).
    upper_miss = np.any(below_quantile >= upper_ranks, axis=1)
    # Lower bound X_(k_lo) above Q(p): fewer than k_lo observations at or below Q(p).
    lower_miss = np.any(below_quantile < lower_ranks, axis=1)
    ceiling = monte_carlo_ceiling(alpha, replications)
    if one_sided:
        assert upper_miss.mean() <= ceiling
        assert lower_miss.mean() <= ceiling
    else:
        assert (upper_miss | lower_miss).mean() <= ceiling
    # The bounds are informative by the horizon (not trivially valid).
    assert lower_ranks[-1] >= 1
    assert upper_ranks[-1] <= horizon


class BucketedArms:
    """Cumulative per-experiment bucket counts of lognormal latencies, drawn in batches."""

    def __init__(self, experiments: int, median_ms: float, sigma: float) -> None:
        self.experiments = experiments
        self.median_ms = median_ms
        self.sigma = sigma
        self.reference = LogHistogram()
        self.offset = self.reference.min_index
        width = self.reference.max_index - self.offset + 1
        self.cumulative = np.zeros((experiments, width), dtype=np.int64)
        self.inverse_log_gamma = 1.0 / math.log(self.reference.upper_edge(1))

    def draw(self, rng: np.random.Generator, batch: int) -> None:
        values = rng.lognormal(math.log(self.median_ms), self.sigma, (self.experiments, batch))
        # The histogram's bucket rule (routing/observe/histogram.py), vectorised.
        indices = np.ceil(np.log(values) * self.inverse_log_gamma).astype(np.int64) - self.offset
        rows = np.repeat(np.arange(self.experiments), batch)
        np.add.at(self.cumulative, (rows, indices.ravel()), 1)

    def histogram(self, experiment: int) -> LogHistogram:
        row = self.cumulative[experiment]
        occupied = np.flatnonzero(row)
        return LogHistogram.from_bucket_counts(
            dict(zip((occupied + self.offset).tolist(), row[occupied].tolist(), strict=True))
        )


def first_rollback_sizes(
    *,
    experiments: int,
    treatment_multiplier: float,
    batch: int,
    looks: int,
    alpha: float,
    margin: float = 0.0,
) -> np.ndarray:
    """Per-arm sample size at the first look where the p95 guardrail fires (inf if never)."""
    rng = np.random.default_rng(SEED)
    control = BucketedArms(experiments, median_ms=100.0, sigma=0.5)
    treatment = BucketedArms(experiments, median_ms=100.0 * treatment_multiplier, sigma=0.5)
    stopped_at = np.full(experiments, np.inf)
    for look in range(1, looks + 1):
        control.draw(rng, batch)
        treatment.draw(rng, batch)
        for experiment in np.flatnonzero(np.isinf(stopped_at)):
            result = quantile_guardrail(
                control.histogram(experiment),
                treatment.histogram(experiment),
                p=0.95,
                alpha=alpha,
                t_opt=batch * looks / 2,
            )
            if result.harm_lower_bound > margin:
                stopped_at[experiment] = look * batch
    return stopped_at


def test_vectorised_bucketing_matches_the_histogram() -> None:
    arms = BucketedArms(1, median_ms=100.0, sigma=0.5)
    values = np.random.default_rng(SEED).lognormal(math.log(100.0), 0.5, 2_000)
    reference = LogHistogram()
    reference.add_many(values.tolist())
    indices = np.ceil(np.log(values) * arms.inverse_log_gamma).astype(np.int64)
    assert dict(reference) == dict(zip(*np.unique(indices, return_counts=True), strict=True))


def test_aa_false_rollback_rate_under_continuous_monitoring_is_at_most_alpha() -> None:
    # 1,000 A/A experiments, a look after every 250 requests per arm up to 5,000 per arm
    # (20 looks), p95 guardrail with margin 0 at alpha = 0.05.
    experiments, alpha = 1_000, 0.05
    stopped_at = first_rollback_sizes(
        experiments=experiments, treatment_multiplier=1.0, batch=250, looks=20, alpha=alpha
    )
    false_rollback_rate = np.isfinite(stopped_at).mean()
    assert false_rollback_rate <= monte_carlo_ceiling(alpha, experiments)


def test_a_twenty_percent_p95_regression_is_caught() -> None:
    # Treatment latencies 1.2x control's: +20% at every quantile, p95 included.
    stopped_at = first_rollback_sizes(
        experiments=200, treatment_multiplier=1.2, batch=250, looks=20, alpha=0.05
    )
    caught = np.isfinite(stopped_at)
    assert caught.mean() >= 0.95
    assert np.median(stopped_at) <= 2_500
