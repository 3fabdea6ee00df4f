"""CI version of bench/ramp_cohorts.py: an A/A ramp with delayed conversions, 80 seeded runs.

The full benchmark (1,000 runs per world) checks the Wilson upper bound against alpha; here
the same code shows the bias the pooled analysis has and the new one does not.
"""

from __future__ import annotations

from bench.ramp_cohorts import ANALYSES, WORLDS, simulate, wilson_upper


def test_windows_and_cohorts_remove_the_false_rollbacks_of_a_ramp() -> None:
    runs = 80
    results = {
        world.name: dict(zip(ANALYSES, simulate(world, runs=runs), strict=True)) for world in WORLDS
    }
    for world, counts in results.items():
        # Pooled, an identical canary is rolled back in (nearly) every run ...
        assert counts["pooled"] >= 0.9 * runs, (world, counts)
        # ... with a window and cohorts, at about the rate the guardrail's alpha allows.
        assert counts["window + cohorts"] <= 0.05 * runs, (world, counts)
    # With drift, the window alone is not enough: early control units still meet late
    # canary units (Simpson's paradox across ramp steps).
    drift = results["delay + drift"]
    assert wilson_upper(drift["window, pooled"], runs) > 0.2
    assert drift["window, pooled"] > 5 * drift["window + cohorts"]
