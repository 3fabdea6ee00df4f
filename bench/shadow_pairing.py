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

Run: .venv/bin/python -m bench.shadow_pairing [--runs 200] [--effect 0.1]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from analysis.stats.shadow_pairs import PairedLatency, latency_ratio_cs

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--effect", type=float, default=0.10)
    parser.add_argument("--max-pairs", type=int, default=20_000)
    parser.add_argument("--look", type=int, default=25)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
