"""How many fewer users a paired shadow test needs than an unpaired one, on the same data.

World. Users arrive one after another; each contributes one pair (its first mirrored request,
as the proxy records it: ``routing.observe.shadow_pairs``). A user's control latency is
``C = 100 ms * U * R * e_C`` and the shadow's ``S = (1 + effect) * 100 ms * U * R * e_S``:
``U = exp(N(0, user_sd^2))`` is the user's level (region, client, payload habits), ``R =
exp(N(0, request_sd^2))`` the request's own size (shared by both answers: the same request),
``e_C``, ``e_S = exp(N(0, noise_sd^2))`` the two servers' independent noise. Defaults: effect
+10%, user_sd 0.5, request_sd 0.5, noise_sd 0.1, so most of the variance is between requests
and users, as in real serving.

Tests. Both are the confidence sequence for the latency ratio ``E S / E C`` of
``analysis.stats.shadow_pairs.latency_ratio_cs`` (normal mixture, Howard et al. 2021, inverted
over the ratio), at alpha = 0.05, looked at after every ``look`` pairs: the paired one uses the
covariance of ``S`` and ``C``, the unpaired one leaves it out (two independent samples of the
same size), which is all that separates them. The stopping size is the first look at which the
CS excludes 1 (the shadow is slower). Printed: the median and 80th-percentile stopping sizes of
each test and their ratios (unpaired / paired); a run that never stops within ``max_pairs``
counts as ``max_pairs`` (so the ratios are lower bounds when that happens; the count is printed).

p95 (``--p95``). The paired p95 latency ratio of the verdict (``theta = sqrt(Q95 Q05)`` of the
per-pair ratios ``S / C`` with the quantile CSs of Howard & Ramdas 2022,
``analysis.stats.paired_quantile``) against the per-arm p95 ratio it replaced (each arm's p95
CS at alpha / 2, joined by a union bound: ``quantile_ratio_cs``), on the same pairs, both at
the verdict's level alpha / 3 and against the same tolerance (+20%): the stopping size is the
first look at which the CS lies wholly on one side of 1.2 (a verdict, "worse" or "ready").
The two estimate different things (``analysis.stats.paired_quantile``), so each world prints
both true values, from a million simulated pairs; in these worlds (a uniform slowdown, noise
symmetric in the log) they agree, and so do the verdicts. The verdict's 200-pair burn-in
(``SHADOW_MIN_PAIRS``) is not applied: the sizes are what each CS needs.

Run: .venv/bin/python -m bench.shadow_pairing [--runs 200] [--effect 0.1] [--p95]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from analysis.stats.paired_quantile import paired_p95_cs
from analysis.stats.quantiles import quantile_ratio_cs
from analysis.stats.shadow_pairs import PairedLatency, latency_ratio_cs
from routing.observe.histogram import LogHistogram

N_STAR = 2000.0


@dataclass(frozen=True)
class World:
    effect: float = 0.10
    user_sd: float = 0.5
    request_sd: float = 0.5
    noise_sd: float = 0.1
    base_ms: float = 100.0


def pairs(world: World, n: int, rng: np.random.Generator) -> tuple[NDArray, NDArray]:
    """Control's and the shadow's latencies (ms) of n users' pairs."""
    shared = world.base_ms * np.exp(
        rng.normal(0.0, world.user_sd, n) + rng.normal(0.0, world.request_sd, n)
    )
    control = shared * np.exp(rng.normal(0.0, world.noise_sd, n))
    shadow = (1.0 + world.effect) * shared * np.exp(rng.normal(0.0, world.noise_sd, n))
    return control, shadow


def stopping_sizes(
    control: NDArray,
    shadow: NDArray,
    *,
    look: int,
    alpha: float = 0.05,
) -> tuple[int | None, int | None]:
    """First look (in pairs) at which the paired / unpaired CS excludes a ratio of 1."""
    sums = [np.cumsum(v) for v in (control, shadow, control**2, shadow**2, control * shadow)]
    found: dict[bool, int | None] = {True: None, False: None}
    for n in range(look, len(control) + 1, look):
        stats = PairedLatency(n, *(float(s[n - 1]) for s in sums))
        for paired in (True, False):
            if found[paired] is None:
                interval = latency_ratio_cs(stats, alpha=alpha, n_star=N_STAR, paired=paired)
                if interval.lower > 1.0 or interval.upper < 1.0:
                    found[paired] = n
        if found[True] is not None and found[False] is not None:
            break
    return found[True], found[False]


@dataclass(frozen=True)
class Comparison:
    paired: NDArray
    unpaired: NDArray
    censored_paired: int
    censored_unpaired: int

    def ratio(self, q: float) -> float:
        return float(np.quantile(self.unpaired, q) / np.quantile(self.paired, q))


def compare(world: World, *, runs: int, max_pairs: int, look: int, seed: int = 0) -> Comparison:
    paired, unpaired = [], []
    censored = [0, 0]
    for run in range(runs):
        rng = np.random.default_rng([seed, run])
        control, shadow = pairs(world, max_pairs, rng)
        first_paired, first_unpaired = stopping_sizes(control, shadow, look=look)
        if first_paired is None:
            censored[0] += 1
        if first_unpaired is None:
            censored[1] += 1
        paired.append(first_paired or max_pairs)
        unpaired.append(first_unpaired or max_pairs)
    return Comparison(np.array(paired), np.array(unpaired), censored[0], censored[1])


def p95_stopping_sizes(
    control: NDArray, shadow: NDArray, *, look: int, tolerance: float, alpha: float
) -> tuple[int | None, int | None]:
    """First look (in pairs) at which the paired / per-arm p95 CS excludes ``1 + tolerance``."""
    limit = 1.0 + tolerance
    histograms = {"c": LogHistogram(), "s": LogHistogram(), "r": LogHistogram()}
    ratios = np.maximum(shadow, 1e-3) / np.maximum(control, 1e-3)
    found: dict[bool, int | None] = {True: None, False: None}
    for n in range(look, len(control) + 1, look):
        for name, values in (("c", control), ("s", shadow), ("r", ratios)):
            histograms[name].add_many(float(v) for v in values[n - look : n])
        if found[True] is None:
            paired = paired_p95_cs(histograms["r"], alpha=alpha, t_opt=N_STAR)
            if paired.lower > limit or paired.upper < limit:
                found[True] = n
        if found[False] is None:
            lower, upper = quantile_ratio_cs(
                histograms["c"], histograms["s"], p=0.95, alpha=alpha, t_opt=N_STAR
            )
            if lower > limit or upper < limit:
                found[False] = n
        if found[True] is not None and found[False] is not None:
            break
    return found[True], found[False]


def p95_truths(world: World, seed: int = 99) -> tuple[float, float]:
    """(paired p95 latency ratio, per-arm p95 ratio) of a world, from a million pairs."""
    control, shadow = pairs(world, 1_000_000, np.random.default_rng(seed))
    ratios = shadow / control
    paired = float(np.sqrt(np.quantile(ratios, 0.95) * np.quantile(ratios, 0.05)))
    return paired, float(np.quantile(shadow, 0.95) / np.quantile(control, 0.95))


def compare_p95(
    world: World,
    *,
    runs: int,
    max_pairs: int,
    look: int,
    tolerance: float = 0.2,
    alpha: float = 0.05 / 3,
    seed: int = 0,
) -> Comparison:
    paired, unpaired = [], []
    censored = [0, 0]
    for run in range(runs):
        rng = np.random.default_rng([seed, run])
        control, shadow = pairs(world, max_pairs, rng)
        first_paired, first_unpaired = p95_stopping_sizes(
            control, shadow, look=look, tolerance=tolerance, alpha=alpha
        )
        censored[0] += first_paired is None
        censored[1] += first_unpaired is None
        paired.append(first_paired or max_pairs)
        unpaired.append(first_unpaired or max_pairs)
    return Comparison(np.array(paired), np.array(unpaired), censored[0], censored[1])


# The p95 worlds (the mean's world otherwise): a shadow 50% slower ("worse" at +20%), one 10%
# slower and one as fast ("ready").
P95_WORLDS = {
    "+50%": World(effect=0.5),
    "+10%": World(effect=0.1),
    "as fast": World(effect=0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--effect", type=float, default=0.10)
    parser.add_argument("--max-pairs", type=int, default=20_000)
    parser.add_argument("--look", type=int, default=25)
    parser.add_argument("--p95", action="store_true", help="compare the p95 tests instead")
    args = parser.parse_args()
    if args.p95:
        main_p95(args.runs, args.max_pairs, args.look)
        return
    world = World(effect=args.effect)
    started = time.perf_counter()
    result = compare(world, runs=args.runs, max_pairs=args.max_pairs, look=args.look)
    elapsed = time.perf_counter() - started
    print(f"world: {world}, {args.runs} runs, a look every {args.look} pairs ({elapsed:.1f} s)")
    for name, sizes, censored in (
        ("paired", result.paired, result.censored_paired),
        ("unpaired", result.unpaired, result.censored_unpaired),
    ):
        print(
            f"{name:>9}: median {np.median(sizes):,.0f} users, 80th percentile "
            f"{np.quantile(sizes, 0.8):,.0f}; never stopped within {args.max_pairs:,}: {censored}"
        )
    print(
        f"ratio unpaired / paired: median {result.ratio(0.5):.1f}x, "
        f"80th percentile {result.ratio(0.8):.1f}x"
    )


def _print(result: Comparison, max_pairs: int, names: tuple[str, str]) -> None:
    for name, sizes, censored in (
        (names[0], result.paired, result.censored_paired),
        (names[1], result.unpaired, result.censored_unpaired),
    ):
        print(
            f"{name:>9}: median {np.median(sizes):,.0f} users, 80th percentile "
            f"{np.quantile(sizes, 0.8):,.0f}; never stopped within {max_pairs:,}: {censored}"
        )
    print(
        f"ratio {names[1]} / {names[0]}: median {result.ratio(0.5):.1f}x, "
        f"80th percentile {result.ratio(0.8):.1f}x"
    )


def main_p95(runs: int, max_pairs: int, look: int) -> None:
    for label, world in P95_WORLDS.items():
        paired_truth, per_arm_truth = p95_truths(world)
        started = time.perf_counter()
        result = compare_p95(world, runs=runs, max_pairs=max_pairs, look=look)
        elapsed = time.perf_counter() - started
        print(
            f"{label}: {world}; paired p95 ratio {paired_truth:.3f}, per-arm p95 ratio "
            f"{per_arm_truth:.3f}, tolerance 1.2; {runs} runs, a look every {look} pairs "
            f"({elapsed:.1f} s)"
        )
        _print(result, max_pairs, ("paired", "per-arm"))


if __name__ == "__main__":
    main()
