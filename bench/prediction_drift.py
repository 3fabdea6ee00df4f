"""Seeded simulations of the prediction-drift test (analysis.stats.prediction_drift).

Worlds: users arrive over the run and make Pareto(1.2) numbers of requests (at most 50);
each user has its own class propensities (Dirichlet around the arm's distribution at the
user's first request, concentration 5: sticky users), and the traffic mix drifts over the run
(class 0 from 40% to 20%). The canary ramps 1 -> 5 -> 10 -> 25 -> 50% (a user is in the
canary if its hash is below the share at its request, so users only ever move into it).

* A/A: the false-alarm rate of the test on users' first predictions (tolerance 0 and 0.02),
  and of the same bet placed on every request (the per-request construction STATS.md 12.1
  warns about), in the same worlds.
* The null's boundary: the canary's distribution is exactly the tolerance away (TV = eps).
* Power: one class 10 points more frequent in the canary at a fixed share; the users (both
  arms) until the alarm, median and 80th percentile, against the two-sided fixed-horizon
  chi-square test's users for 80% power (statsmodels GofChisquarePower on the 2 x K table).

    python -m bench.prediction_drift [runs]
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from analysis.stats.prediction_drift import running_log_e

ALPHA = 0.05
RAMP = (0.01, 0.05, 0.10, 0.25, 0.50)
BASE = np.array([0.4, 0.3, 0.2, 0.1])
MAX_REQUESTS = 50
CONCENTRATION = 5.0


def _mix(t: NDArray[np.float64]) -> NDArray[np.float64]:
    """The drifting traffic mix: class 0 falls from 40% to 20% over the run."""
    mix = np.tile(BASE, (t.size, 1))
    mix[:, 0] -= 0.2 * t
    mix[:, 1] += 0.2 * t
    return mix


def _shifted(p: NDArray[np.float64], shift: float) -> NDArray[np.float64]:
    """Class 2 `shift` points more frequent, class 1 less (TV = shift)."""
    out = p.copy()
    out[:, 2] += shift
    out[:, 1] -= shift
    return out


@dataclass(frozen=True)
class World:
    first_cats: NDArray[np.int64]
    first_treated: NDArray[np.bool_]
    first_share: NDArray[np.float64]
    request_cats: NDArray[np.int64]
    request_treated: NDArray[np.bool_]
    request_share: NDArray[np.float64]


def world(
    rng: np.random.Generator,
    users: int,
    *,
    shift: float = 0.0,
    ramp: tuple[float, ...] = RAMP,
    sticky: bool = True,
) -> World:
    start = np.sort(rng.random(users))
    counts = np.minimum(np.floor(rng.pareto(1.2, users) + 1).astype(int), MAX_REQUESTS)
    hashes = rng.random(users)
    owner = np.repeat(np.arange(users), counts)
    # Later requests of a user come after its first, within the run.
    times = start[owner] + rng.random(owner.size) * (1 - start[owner]) * 0.2
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    times[first] = start
    step = np.minimum((times * len(ramp)).astype(int), len(ramp) - 1)
    share = np.asarray(ramp)[step]
    treated = hashes[owner] < share
    control_p = _mix(start)
    if sticky:
        alpha = np.maximum(control_p * CONCENTRATION, 1e-3)
        own = np.stack([rng.dirichlet(a) for a in alpha])
    else:
        own = control_p
    canary_own = np.clip(_shifted(own, shift), 0.0, None)
    canary_own /= canary_own.sum(axis=1, keepdims=True)
    p = np.where(treated[:, None], canary_own[owner], own[owner])
    cats = (rng.random(owner.size)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    cats = np.minimum(cats, BASE.size - 1)
    order = np.argsort(times, kind="stable")
    return World(
        first_cats=cats[first],
        first_treated=treated[first],
        first_share=share[first],
        request_cats=cats[order],
        request_treated=treated[order],
        request_share=share[order],
    )


@dataclass(frozen=True)
class FalseAlarms:
    runs: int
    users: int
    requests: int


def false_alarms(
    runs: int, *, users: int = 3000, tolerance: float = 0.0, shift: float = 0.0, seed: int = 1
) -> FalseAlarms:
    """Runs (of `runs`) in which the user test and the per-request bet raised an alarm."""
    rng = np.random.default_rng(seed)
    threshold = math.log(1 / ALPHA)
    on_users = on_requests = 0
    for _ in range(runs):
        w = world(rng, users, shift=shift)
        kwargs = {"tolerance": tolerance, "n_categories": BASE.size}
        path = running_log_e(w.first_cats, w.first_treated, w.first_share, **kwargs)
        on_users += bool(path.max() >= threshold)
        path = running_log_e(w.request_cats, w.request_treated, w.request_share, **kwargs)
        on_requests += bool(path.max() >= threshold)
    return FalseAlarms(runs=runs, users=on_users, requests=on_requests)


def detection(
    runs: int,
    *,
    shift: float = 0.10,
    share: float = 0.5,
    tolerance: float = 0.02,
    users: int = 20_000,
    seed: int = 2,
) -> NDArray[np.float64]:
    """Users (both arms) until the alarm in each run (inf if none), one prediction each."""
    rng = np.random.default_rng(seed)
    threshold = math.log(1 / ALPHA)
    found = np.full(runs, np.inf)
    for run in range(runs):
        treated = rng.random(users) < share
        p = np.tile(BASE, (users, 1))
        p = np.where(treated[:, None], _shifted(p, shift), p)
        cats = (rng.random(users)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
        path = running_log_e(
            np.minimum(cats, BASE.size - 1),
            treated,
            np.full(users, share),
            tolerance=tolerance,
            n_categories=BASE.size,
        )
        hits = np.nonzero(path >= threshold)[0]
        if hits.size:
            found[run] = hits[0] + 1
    return found


def fixed_horizon_users(*, shift: float = 0.10, share: float = 0.5, power: float = 0.8) -> float:
    """Users (both arms) a fixed-horizon chi-square test of the 2 x K table needs."""
    from statsmodels.stats.power import GofChisquarePower

    canary = _shifted(BASE[None, :], shift)[0]
    joint = np.concatenate([(1 - share) * BASE, share * canary])
    independent = np.concatenate(
        [
            (1 - share) * (1 - share) * BASE + (1 - share) * share * canary,
            share * (1 - share) * BASE + share * share * canary,
        ]
    )
    effect = math.sqrt(float(((joint - independent) ** 2 / independent).sum()))
    return float(
        GofChisquarePower().solve_power(
            effect_size=effect, alpha=ALPHA, power=power, n_bins=BASE.size
        )
    )


def main(runs: int = 500) -> None:
    for tolerance in (0.0, 0.02):
        rates = false_alarms(runs, tolerance=tolerance, seed=11)
        print(
            f"A/A ramp, sticky users, tolerance {tolerance}: users {rates.users}/{runs}, "
            f"per request {rates.requests}/{runs}"
        )
    boundary = false_alarms(runs, tolerance=0.05, shift=0.05, seed=12)
    print(f"null boundary TV = tolerance = 0.05: users {boundary.users}/{runs}")
    fixed = fixed_horizon_users()
    for share, tolerance in ((0.5, 0.0), (0.5, 0.02), (0.5, 0.05), (0.1, 0.02)):
        found = detection(max(runs // 2, 50), share=share, tolerance=tolerance, seed=13)
        print(
            f"10-point shift, share {share}, tolerance {tolerance}: detected "
            f"{np.isfinite(found).mean():.0%}, median {np.median(found):,.0f} users, "
            f"80th percentile {np.quantile(found, 0.8):,.0f} (fixed-horizon chi-square at 80% "
            f"power, share 0.5: {fixed:,.0f})"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
