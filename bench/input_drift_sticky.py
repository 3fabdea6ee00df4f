"""Seeded simulation of input drift with sticky users: a whole experiment, window by window.

A population of `users` users (8,000 by default), stationary in law over time: each window 10%
of the users leave and as many new ones of the same law arrive. A user sends Poisson(m)
requests per window, m heavy-tailed (0.1 x Pareto(1.2), capped at 500: most users send a
request now and then, a few send hundreds). Heavy users (m > 1) have other inputs than light
ones: a number field log-normal with median 120 instead of 50, a category field with other
shares. Each user has a favourite value of each field (drawn from its kind's distribution) and
repeats it in 80% of its requests; the rest are fresh draws. Two watched fields, alpha = 0.05
split between them. The reference lasts `reference` (4) windows; `windows` (24) monitoring
windows follow.

Constructions compared on the same worlds:

* users (the one in use: `experiments.input_windows`, `analysis.stats.input_drift`): users
  sampled by hash, split into a reference half (each counted in the one reference window its
  hash picks, if active there) and a monitoring half counted once per window (its first
  request's value); each closed window tested once with the exact conditional e-value
  (`analysis.stats.split_e`), flagged when E_k >= 2 / (w_k alpha), w_k = 1 / (k (k + 1)).
  With `processes` > 1, requests go to edge processes at random and each process counts a
  user once per window (the duplicates of several processes); with `claims` the flushes'
  claims (`routing.observe.inputs`) keep one count per user and window across processes (the
  count of the process whose flush claimed the user first: one of the user's requests,
  whichever process it is, so a draw from the user's law like any other).
* requests (the construction before): 10% of requests sampled at random, the reference is
  every sampled request of the reference period, and at each window's end the
  Dirichlet-multinomial e-value of every request since the reference (E >= 2 / alpha) and
  the PSI of the last window.

A/A: PSI threshold 0 (the e-value alone decides: the worst case for validity); the share of
runs with any field flagged over all windows. Shifts (from monitoring window `shift_at` on):
the number's median +30% (every value x 1.3) or 10 points of the category moved from the first
to the second value, PSI thresholds `THRESHOLDS`: the windows until flagged and the monitored
users counted until then.

    python -m bench.input_drift_sticky [runs]
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from analysis.stats.input_drift import (
    field_drift,
    flagged,
    grouped,
    homogeneity_log_e,
    merge_groups,
    window_log_threshold,
)
from analysis.stats.prediction_drift import psi, shares
from experiments.input_cells import LOG_HIGH, LOG_LOW, cell_order

ALPHA = 0.05
FIELDS = 2
REPEAT = 0.8
# PSI thresholds of the shifts (number, category): below the shifts' PSI of one window of users.
THRESHOLDS = (0.05, 0.05)
MEDIANS = (50.0, 120.0)  # light, heavy
CATEGORIES = np.array([[0.4, 0.25, 0.15, 0.12, 0.08], [0.15, 0.45, 0.2, 0.1, 0.1]])


@dataclass(frozen=True)
class World:
    users: int = 8_000
    reference: int = 4
    windows: int = 24
    processes: int = 1
    claims: bool = False
    number_shift: float = 0.0
    category_shift: float = 0.0
    shift_at: int = 1
    churn: float = 0.1


def _number_cells(values: NDArray[np.float64]) -> NDArray[np.int64]:
    """The proxy's log-grid cell index (`log_cell`: "+k" with k = floor(4 log10 v), clamped)."""
    return np.clip(np.floor(4 * np.log10(values)), LOG_LOW, LOG_HIGH).astype(np.int64)


class Population:
    def __init__(self, rng: np.random.Generator, world: World) -> None:
        self.rng, self.world = rng, world
        self.rate = np.minimum(0.1 * (rng.pareto(1.2, world.users) + 1.0), 500.0)
        self.heavy = (self.rate > 1.0).astype(np.int64)
        self.share = rng.random(world.users)  # the hash share of each user
        self.favourite_number = self._fresh_numbers(np.arange(world.users))
        self.favourite_category = self._fresh_categories(np.arange(world.users))

    def turn_over(self) -> None:
        """A share `churn` of the users leaves, each replaced by a new one of the same law (the
        population stays stationary; the individuals change)."""
        rng, world = self.rng, self.world
        gone = np.flatnonzero(rng.random(world.users) < world.churn)
        self.rate[gone] = np.minimum(0.1 * (rng.pareto(1.2, gone.size) + 1.0), 500.0)
        self.heavy[gone] = (self.rate[gone] > 1.0).astype(np.int64)
        self.share[gone] = rng.random(gone.size)
        self.favourite_number[gone] = self._fresh_numbers(gone)
        self.favourite_category[gone] = self._fresh_categories(gone)

    def _fresh_numbers(self, users: NDArray[np.int64]) -> NDArray[np.float64]:
        medians = np.array(MEDIANS)[self.heavy[users]]
        return self.rng.lognormal(np.log(medians), 0.8)

    def _fresh_categories(self, users: NDArray[np.int64]) -> NDArray[np.int64]:
        cumulative = CATEGORIES.cumsum(axis=1)[self.heavy[users]]
        draws = self.rng.random(users.size)[:, None]
        return np.minimum((draws >= cumulative).sum(axis=1), CATEGORIES.shape[1] - 1)

    def draws(self, users: NDArray[np.int64], shifted: bool) -> tuple[NDArray, NDArray]:
        """One request's values for each user in `users` (repeats allowed): cells of both fields."""
        repeat = self.rng.random(users.size) < REPEAT
        numbers = np.where(repeat, self.favourite_number[users], self._fresh_numbers(users))
        categories = np.where(repeat, self.favourite_category[users], self._fresh_categories(users))
        world = self.world
        if shifted and world.number_shift:
            numbers = numbers * (1.0 + world.number_shift)
        if shifted and world.category_shift:
            first = CATEGORIES[self.heavy[users], 0]
            move = (categories == 0) & (self.rng.random(users.size) < world.category_shift / first)
            categories = np.where(move, 1, categories)
        return _number_cells(numbers), categories


def _number_counts(cells: NDArray[np.int64]) -> dict[str, float]:
    found = np.bincount(cells - LOG_LOW, minlength=LOG_HIGH - LOG_LOW + 1)
    return {f"+{LOG_LOW + i}": float(n) for i, n in enumerate(found) if n}


def _category_counts(cells: NDArray[np.int64]) -> dict[str, float]:
    found = np.bincount(cells, minlength=CATEGORIES.shape[1])
    return {f"c{i}": float(n) for i, n in enumerate(found) if n}


def _add(target: dict[str, float], counts: dict[str, float]) -> None:
    for cell, n in counts.items():
        target[cell] = target.get(cell, 0.0) + n


def _flags(
    reference: list[dict[str, float]],
    window: list[dict[str, float]],
    *,
    thresholds: tuple[float, float],
    index: int,
) -> bool:
    alpha = ALPHA / FIELDS
    for field, (ref, now, threshold) in enumerate(zip(reference, window, thresholds, strict=True)):
        ordered = sorted(set(ref) | set(now), key=cell_order) if field == 0 else None
        drift = field_drift(ref, now, ordered=ordered)
        if flagged(drift, threshold=threshold, alpha=alpha, window=index):
            return True
    return False


def _counted(
    rng: np.random.Generator, requests: NDArray[np.int64], processes: int, claims: bool = False
) -> NDArray:
    """How many times each user is counted in a window: once per edge process it reached, or
    once in all with the flushes' claims."""
    if processes == 1:
        return (requests > 0).astype(np.int64)
    # Each request goes to a process at random; a user counts once per distinct process.
    owner = np.repeat(np.arange(requests.size), requests)
    pairs = np.unique(owner * processes + rng.integers(processes, size=owner.size))
    reached = np.bincount(pairs // processes, minlength=requests.size)
    return np.minimum(reached, 1) if claims else reached


def run_users(
    rng: np.random.Generator, world: World, thresholds: tuple[float, float]
) -> tuple[float, int]:
    """(monitoring window first flagged or inf, monitored users counted until then)."""
    people = Population(rng, world)
    users = np.arange(world.users)
    reference: list[dict[str, float]] = [{}, {}]
    for window in range(world.reference):
        people.turn_over()
        half = people.share < 0.5
        picked = np.minimum(
            (people.share * 2 * world.reference).astype(np.int64), world.reference - 1
        )
        requests = rng.poisson(people.rate)
        times = _counted(rng, requests, world.processes, world.claims)
        who = np.repeat(users[half & (picked == window)], times[half & (picked == window)])
        numbers, categories = people.draws(who, shifted=False)
        _add(reference[0], _number_counts(numbers))
        _add(reference[1], _category_counts(categories))
    seen = 0
    for index in range(1, world.windows + 1):
        people.turn_over()
        half = people.share < 0.5
        requests = rng.poisson(people.rate)
        times = _counted(rng, requests, world.processes, world.claims)
        who = np.repeat(users[~half], times[~half])
        numbers, categories = people.draws(who, shifted=index >= world.shift_at)
        seen += who.size if index >= world.shift_at else 0
        window = [_number_counts(numbers), _category_counts(categories)]
        if _flags(reference, window, thresholds=thresholds, index=index):
            return float(index), seen
    return math.inf, seen


def run_requests(
    rng: np.random.Generator, world: World, thresholds: tuple[float, float], rate: float = 0.1
) -> tuple[float, int]:
    """The per-request construction: (monitoring window first flagged or inf, requests)."""
    people = Population(rng, world)
    users = np.arange(world.users)
    reference: list[dict[str, float]] = [{}, {}]
    since: list[dict[str, float]] = [{}, {}]
    seen = 0
    for index in range(-world.reference + 1, world.windows + 1):
        people.turn_over()
        sampled = rng.binomial(rng.poisson(people.rate), rate)
        who = np.repeat(users, sampled)
        numbers, categories = people.draws(who, shifted=index >= world.shift_at)
        window = [_number_counts(numbers), _category_counts(categories)]
        if index <= 0:
            _add(reference[0], window[0])
            _add(reference[1], window[1])
            continue
        seen += who.size
        _add(since[0], window[0])
        _add(since[1], window[1])
        for field in range(FIELDS):
            if _old_flag(reference[field], window[field], since[field], field, thresholds[field]):
                return float(index), seen
    return math.inf, seen


def _old_flag(
    ref: dict[str, float], now: dict[str, float], since: dict[str, float], field: int, limit: float
) -> bool:
    """The test before: the Dirichlet-multinomial e-value of every request since the
    reference >= (fields) / alpha, and the PSI of the last window above `limit`."""
    ordered = sorted(set(ref) | set(since), key=cell_order) if field == 0 else None
    mapping = merge_groups(ref, ordered=ordered)
    size = max(mapping.values()) + 1
    x, y, last = (grouped(c, mapping, size) for c in (ref, since, now))
    distance = psi(shares(last), shares(x)) if last.sum() > 0 else 0.0
    return distance > limit and homogeneity_log_e(x, y) >= math.log(FIELDS / ALPHA)


def false_alarms(
    runs: int, *, seed: int, construction: str = "users", threshold: float = 0.0, **world: int
) -> int:
    """Runs flagged over all windows in A/A worlds (PSI `threshold` for both fields)."""
    rng = np.random.default_rng(seed)
    run = run_users if construction == "users" else run_requests
    return sum(
        math.isfinite(run(rng, World(**world), (threshold, threshold))[0]) for _ in range(runs)
    )


def detection(runs: int, *, seed: int, **world: float) -> tuple[NDArray, NDArray]:
    """(windows after the shift until flagged, monitored users counted until then) per run."""
    rng = np.random.default_rng(seed)
    shape = World(**world)  # type: ignore[arg-type]
    found = [run_users(rng, shape, THRESHOLDS) for _ in range(runs)]
    windows = np.array([w - shape.shift_at + 1 for w, _ in found])
    return windows, np.array([n for _, n in found], dtype=float)


def wilson_upper(hits: int, runs: int, z: float = 1.96) -> float:
    p = hits / runs
    centre = p + z * z / (2 * runs)
    spread = z * math.sqrt(p * (1 - p) / runs + z * z / (4 * runs * runs))
    return (centre + spread) / (1 + z * z / runs)


def main(runs: int = 500) -> None:
    print(
        f"threshold of window k: log(2/(w_k alpha)) = {window_log_threshold(1, ALPHA / 2):.2f}"
        f" (k=1), {window_log_threshold(24, ALPHA / 2):.2f} (k=24)"
    )
    for label, construction, world in (
        ("users, one edge process", "users", {}),
        ("users, 2 edge processes", "users", {"processes": 2}),
        ("users, 4 edge processes", "users", {"processes": 4}),
        (
            "users, 4 edge processes, claims across processes",
            "users",
            {"processes": 4, "claims": 1},
        ),
        ("users, 4 edge processes, PSI threshold 0.05", "users", {"processes": 4, "psi": 1}),
        ("requests (before)", "requests", {}),
    ):
        count = runs if construction == "users" else max(runs // 5, 50)
        threshold = THRESHOLDS[0] if world.pop("psi", 0) else 0.0
        hits = false_alarms(count, seed=61, construction=construction, threshold=threshold, **world)
        print(
            f"A/A {label}: {hits}/{count} runs flagged over 24 windows "
            f"(Wilson upper {wilson_upper(hits, count):.3f})"
        )
    for label, world in (
        ("number median +30%, from window 1", {"number_shift": 0.3}),
        ("category +10 points, from window 1", {"category_shift": 0.10}),
        ("number median +30%, from window 12", {"number_shift": 0.3, "shift_at": 12}),
        ("category +10 points, from window 12", {"category_shift": 0.10, "shift_at": 12}),
        ("number median +30%, 2,000 users", {"number_shift": 0.3, "users": 2_000}),
        ("category +10 points, 2,000 users", {"category_shift": 0.10, "users": 2_000}),
    ):
        windows, seen = detection(max(runs // 5, 30), seed=62, **world)
        caught = np.isfinite(windows)
        print(
            f"{label}: detected {caught.mean():.0%} within {World().windows} windows, windows "
            f"after the shift median {np.median(windows):.0f} (80th percentile "
            f"{np.quantile(windows, 0.8):.0f}), monitored users counted until then median "
            f"{np.median(seen[caught]) if caught.any() else math.nan:,.0f}"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
