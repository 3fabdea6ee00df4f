"""Seeded simulations of the input-drift test (analysis.stats.input_drift).

A numeric field (log-normal, binned on the proxy's signed log grid) and a categorical one
(5 categories). The reference is the first `reference` requests; then requests arrive and the
worker looks every `look` requests (the e-value of everything since the reference, the PSI of
the last `window`).

* A/A stationary: the same distribution throughout; the rate of runs flagged at any look
  (PSI threshold 0, so the e-value alone decides: the worst case for the test's validity).
* Shifted: after the reference the numeric field's median is 30% higher (PSI about 0.11,
  threshold 0.1) or one category 10 points more frequent (PSI about 0.06, threshold 0.05);
  the requests after the reference until the field is flagged, median and 80th percentile.

    python -m bench.input_drift [runs]
"""

from __future__ import annotations

import math
import sys
from collections import Counter

import numpy as np
from numpy.typing import NDArray

from analysis.stats.input_drift import field_drift, flagged
from experiments.input_cells import cell_order, log_cell

ALPHA = 0.05
CATEGORIES = np.array([0.4, 0.25, 0.15, 0.12, 0.08])


def _cells_number(rng: np.random.Generator, n: int, scale: float) -> list[str]:
    return [log_cell(float(v)) for v in rng.lognormal(math.log(50.0 * scale), 0.8, n)]


def _cells_category(rng: np.random.Generator, n: int, shift: float) -> list[str]:
    p = CATEGORIES.copy()
    p[1] += shift
    p[0] -= shift
    return [f"c{i}" for i in rng.choice(p.size, size=n, p=p)]


def run(
    rng: np.random.Generator,
    *,
    kind: str,
    shift: float,
    threshold: float,
    reference: int = 5_000,
    after: int = 20_000,
    look: int = 500,
    window: int = 2_000,
) -> float:
    """Requests after the reference until flagged (inf if never)."""
    if kind == "number":
        ref = _cells_number(rng, reference, 1.0)
        new = _cells_number(rng, after, 1.0 + shift)
    else:
        ref = _cells_category(rng, reference, 0.0)
        new = _cells_category(rng, after, shift)
    ref_counts = dict(Counter(ref))
    for end in range(look, after + 1, look):
        since = dict(Counter(new[:end]))
        recent = dict(Counter(new[max(0, end - window) : end]))
        ordered = None
        if kind == "number":
            ordered = sorted(set(ref_counts) | set(since), key=cell_order)
        drift = field_drift(ref_counts, recent, since, ordered=ordered)
        if flagged(drift, threshold=threshold, alpha=ALPHA):
            return float(end)
    return math.inf


def false_alarms(runs: int, *, kind: str, seed: int) -> int:
    rng = np.random.default_rng(seed)
    return sum(
        math.isfinite(run(rng, kind=kind, shift=0.0, threshold=0.0, after=10_000))
        for _ in range(runs)
    )


def detection(
    runs: int, *, kind: str, shift: float, threshold: float, seed: int
) -> NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    return np.array([run(rng, kind=kind, shift=shift, threshold=threshold) for _ in range(runs)])


def main(runs: int = 300) -> None:
    for kind in ("number", "category"):
        print(f"A/A stationary {kind}: {false_alarms(runs, kind=kind, seed=31)}/{runs} flagged")
    for kind, shift, threshold in (("number", 0.3, 0.1), ("category", 0.10, 0.05)):
        found = detection(max(runs // 3, 30), kind=kind, shift=shift, threshold=threshold, seed=32)
        print(
            f"{kind} shifted ({shift}, PSI threshold {threshold}): detected "
            f"{np.isfinite(found).mean():.0%}, median {np.median(found):,.0f}, "
            f"80th percentile {np.quantile(found, 0.8):,.0f} requests"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
