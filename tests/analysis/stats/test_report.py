"""analyze_metric: fixed, per-look and always-valid results, state persistence, verdicts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from gbstats.frequentist.tests import SequentialConfig, SequentialTwoSidedTTest
from gbstats.models.statistics import ProportionStatistic
from statsmodels.stats.power import NormalIndPower

from analysis.stats.moments import CupedStats, MeanStats, ProportionStats
from analysis.stats.planning import (
    fixed_horizon_total_n_mean,
    fixed_horizon_total_n_proportion,
    guardrail_n_star_proportion,
)
from analysis.stats.report import SequentialState, Verdict, analyze_metric


def test_first_look_matches_gbstats_raw_values() -> None:
    a, b = ProportionStats(10_000, 1000), ProportionStats(10_000, 1080)
    analysis = analyze_metric("conversion", a, b, n_star=5000, direction="higher_is_better")
    theirs = SequentialTwoSidedTTest(
        ProportionStatistic(n=10_000, sum=1000),
        ProportionStatistic(n=10_000, sum=1080),
        SequentialConfig(difference_type="relative", sequential_tuning_parameter=5000),
    ).compute_result()
    assert (analysis.relative.look.lower, analysis.relative.look.upper) == pytest.approx(
        tuple(theirs.ci), abs=1e-9
    )
    assert analysis.relative.look.p_value == theirs.p_value == 1.0
    assert analysis.relative.fixed.p_value == pytest.approx(0.074599, abs=1e-6)
    assert analysis.absolute.estimate == pytest.approx(0.008)
    assert analysis.control.n == 10_000 and analysis.treatment.mean == pytest.approx(0.108)
    assert analysis.summary.verdict is Verdict.INCONCLUSIVE
    assert "not conclusive" in analysis.summary.sentence()
    assert analysis.state.last_total_n == 20_000


def test_state_carries_running_values_across_looks() -> None:
    rng = np.random.default_rng(21)
    a = b = MeanStats(n=0, sum=0, sum_squares=0)
    state: SequentialState | None = None
    last = None
    for _ in range(25):
        a = a + MeanStats.from_values(rng.normal(100, 15, 400))
        b = b + MeanStats.from_values(rng.normal(103, 15, 400))
        last = analyze_metric(
            "revenue", a, b, previous=state, n_star=8000, direction="higher_is_better"
        )
        # The always-valid p never exceeds the instantaneous one, and the interval never
        # grows: running maximum e-value and running intersection.
        assert last.relative.always_valid_p <= last.relative.look.p_value
        assert last.relative.always_valid_lower >= last.relative.look.lower
        assert last.relative.always_valid_upper <= last.relative.look.upper
        restored = SequentialState.from_dict(json.loads(json.dumps(last.state.to_dict())))
        assert restored == last.state
        state = restored
    assert last is not None and last.state.relative.looks == 25
    assert last.summary.verdict is Verdict.BETTER
    assert "better" in last.summary.sentence()


def test_changing_the_design_or_going_back_in_time_is_refused() -> None:
    a, b = ProportionStats(1000, 100), ProportionStats(1000, 120)
    first = analyze_metric("m", a, b, n_star=5000)
    with pytest.raises(ValueError, match="n_star"):
        analyze_metric("m", a, b, previous=first.state, n_star=6000)
    with pytest.raises(ValueError, match="never shrink"):
        analyze_metric("m", ProportionStats(500, 50), b, previous=first.state, n_star=5000)


def test_cuped_metric_reports_the_adjusted_means() -> None:
    rng = np.random.default_rng(2)
    x_a, x_b = rng.normal(50, 10, 3000), rng.normal(50, 10, 3000)
    y_a, y_b = x_a + rng.normal(0, 5, 3000), x_b + 1 + rng.normal(0, 5, 3000)
    analysis = analyze_metric(
        "spend", CupedStats.from_values(y_a, x_a), CupedStats.from_values(y_b, x_b)
    )
    assert analysis.cuped_theta == pytest.approx(1.0, abs=0.05)
    assert analysis.treatment.unadjusted_mean == pytest.approx(y_b.mean())
    assert analysis.absolute.se < math.sqrt(y_a.var(ddof=1) / 3000 + y_b.var(ddof=1) / 3000) / 2
    assert analysis.summary.verdict is Verdict.HIGHER


def test_no_result_is_reported_plainly() -> None:
    analysis = analyze_metric("m", ProportionStats(100, 0), ProportionStats(100, 4))
    assert analysis.summary.verdict is Verdict.NO_RESULT
    assert analysis.relative.error is not None
    assert analysis.summary.sentence().startswith("Not enough data")


def test_pooled_sample_size_matches_the_spec_reference() -> None:
    # STATS.md 10.2: 1% -> 2%, two-sided alpha 0.05, 80% power: 2,319 per arm (pooled formula),
    # one-sided 1,826 per arm.
    assert fixed_horizon_total_n_proportion(0.01, 0.02) / 2 == pytest.approx(2319, abs=1)
    assert fixed_horizon_total_n_proportion(0.01, 0.02, two_sided=False) / 2 == pytest.approx(
        1826, abs=1
    )
    assert guardrail_n_star_proportion(
        0.01, detectable_relative_harm=1.0, treatment_share=0.5
    ) == pytest.approx(fixed_horizon_total_n_proportion(0.01, 0.02))


def test_mean_sample_size_matches_statsmodels() -> None:
    # NormalIndPower with Cohen's d = change / sd and ratio = n_B / n_A = share_B / share_A.
    n_control = NormalIndPower().solve_power(
        effect_size=0.05 * 120 / 40, alpha=0.05, power=0.8, ratio=0.1 / 0.9
    )
    total = fixed_horizon_total_n_mean(120, 40, relative_change=0.05, treatment_share=0.1)
    assert total == pytest.approx(n_control * (1 + 0.1 / 0.9), rel=1e-4)


def test_three_units_per_arm_is_not_enough_data_not_a_huge_interval() -> None:
    # Three units per arm used to print a relative interval of about +-4,500%.
    a, b = MeanStats.from_values([1.0, 0.0, 2.0]), MeanStats.from_values([5.0, 0.0, 0.0])
    analysis = analyze_metric("revenue", a, b, control_arm="v1", treatment_arm="v2")
    assert analysis.summary.verdict is Verdict.NOT_ENOUGH_DATA
    assert analysis.relative is None and analysis.absolute is None
    assert analysis.control.mean is None and analysis.treatment.n == 3
    assert (
        analysis.not_enough_data == "v1 has 3 and v2 has 3 of the 100 units per arm a report needs"
    )
    assert analysis.summary.sentence() == f"Not enough data: {analysis.not_enough_data}."
    assert "%" not in analysis.summary.sentence()
    # The look does not count, and the next look with enough data is a first look.
    assert analysis.state == SequentialState(n_star=5000.0, alpha=0.05)
    rng = np.random.default_rng(4)
    big_a = MeanStats.from_values(rng.normal(10, 2, 150))
    big_b = MeanStats.from_values(rng.normal(10, 2, 99))
    one_short = analyze_metric("revenue", big_a, big_b, previous=analysis.state)
    assert one_short.not_enough_data == "treatment has 99 of the 100 units per arm a report needs"
    enough = analyze_metric("revenue", big_a, big_a, min_units_per_arm=150)
    assert enough.relative is not None and enough.not_enough_data is None
    assert enough.state.relative.looks == 1
