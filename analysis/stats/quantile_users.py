"""Quantile latency guardrails with the user as the unit: bets on users' shares of slow requests.

Why (STATS.md 12.1, Rampart issue 12 item 1)
    Assignment is sticky per user and users differ in their latency (payloads, regions,
    clients), so a user's requests are not independent. The per-request exceedance e-process
    (`analysis.stats.quantile_exceedance`) then over-counts evidence: in seeded A/A ramps with
    sticky users whose latency factor is exp(N(0, 0.5^2)) it rolled back 16-29% of the runs at
    alpha = 5% (README, `bench/quantile_power.py`). This module takes the user as the unit.
    The same test serves any histogram the edge counts per user: the generative models' time
    to first token too (`bench/llm_sticky.py`), with "request" read as "streamed answer".

The test, for a lower-is-better p-quantile with relative margin m
    1. *Threshold, predictable.* For a user first seen at ``t``, ``k`` is the log-histogram
       bucket (``routing.observe.histogram``: bucket ``i`` holds ``(g^(i-1), g^i]``) that holds
       control's p-quantile over control's closed time buckets that *ended before* ``t``: the
       last ``lookback_s`` seconds, extended back until they hold ``min_requests`` requests
       (`thresholds`). No request of this user is among them, so ``k`` is fixed before the
       user's outcome and arm are seen. A user with too little control data before it is not bet
       on (a rule on time only, which cannot bias the bet).
    2. *Margin as a shift.* A canary user's threshold is ``k + s`` with
       ``s = ceil(log(1 + m) / log g)`` (`margin_shift`), so ``g^(k+s) >= (1 + m) g^k``.
    3. *User outcome.* ``y`` = the share of the user's requests within a fixed window after its
       first request (`routing.observe.unit_outcomes`) whose bucket is above the user's threshold; 0
       for a user with no latency in the window. The rule never looks at the outcome.
    4. *Non-inferiority (for promotion).* The mirror bet of `analysis.stats.betting` uses its
       own outcome: the share *at or above* the threshold bucket, with the canary's threshold
       raised by ``s' = floor(log(1 + m) / log g)`` (``g^s' <= 1 + m``). Under its null "the canary
       is at least ``1 + m`` times slower" the canary's share is then at least control's
       (``X_B > g^(k+s'-1)`` is implied by ``X_B > (1 + m) g^(k-1)``), so the mirror bet is
       valid too; equal constant latencies are shown non-inferior (control's share is 1, the
       canary's 0), which the strict share (0 in both arms) could never show.
    5. *Bet.* ``y`` goes into the inverse-propensity betting e-process of
       `analysis.stats.betting` with margin 0 (the margin is already in the threshold):
       ``phi = y (1{B} / rho_B - 1{A} / rho_A)``, ``rho`` = the known assignment shares at the
       user's first request (Waudby-Smith, Wu, Ramdas, Karampatziakis & Mineiro 2022,
       "Anytime-valid off-policy inference for contextual bandits"; Waudby-Smith & Ramdas 2024,
       JRSS-B). A fast and a slow window are averaged, as for the error rate.

Null hypothesis and guarantee
    H0: at every moment, a user arriving then has, in expectation, no larger share of requests
    above ``(1 + m) c`` under the canary than above ``c`` under control, for every threshold
    ``c`` (implied when each user's latency under the canary is stochastically at most
    ``1 + m`` times its latency under control: every A/A test, every drift or ramp step both
    arms share, any canary nowhere slower than the margin). Bucketing only lowers the canary's
    share: its event ``X > g^(k+s)`` implies ``X > (1 + m) g^k``. Then ``E[phi | past] <= 0`` for
    every user whatever its latency level, the number of its requests or the time (the share
    is known exactly), so the wealth is a test supermartingale and, by Ville's inequality,
    ``P(ever rolled back) <= alpha`` at any number of users and looks, with no burn-in and no
    assumption on how a user's requests depend on each other. The always-valid p-value is
    ``min(1, 1 / max wealth)``. What it tests is a share of users' requests above control's
    recent p-quantile, not the quantile of the pooled requests: a user sending many requests
    counts as much as one sending one (the user is the unit).

Cluster-robust alternative (not used)
    An asymptotic confidence sequence on the exceedance indicator with a user-clustered (delta
    method) variance (Deng, Knoblich & Lu 2018, KDD; GrowthBook's event-level quantiles) needs the
    same per-user counts but is only asymptotically valid and needs a burn-in; the bet above is
    exact and reuses the error-rate guardrail's machinery.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from analysis.stats.guardrail_types import GuardrailEvidence, GuardrailSpec, GuardrailStatus
from analysis.stats.rate_guardrail import UserRateBets, rate_evidence

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

METHOD = "betting e-process on users (known assignment share), exact"
# Control's threshold looks back at least this long (seconds) before a user's first request.
DEFAULT_LOOKBACK_S = 60.0
# Extra harm e-processes for the always-valid lower bound on the harm once the guardrail has
# fired (`UserQuantileBets.bounds`): the canary's threshold raised this many buckets beyond the
# margin's (2% each: about +2%, +4%, +8%, +17%, +37%, +88%, +254% and +1,150% on 1 + m).
BOUND_STEPS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


def default_min_requests(p: float) -> int:
    """Fewest control requests behind a threshold: about 10 above the p-quantile."""
    return math.ceil(10.0 / (1.0 - p))


def margin_shift(margin: float, log_ratio: float, *, harm: bool = True) -> int:
    """Buckets to raise a canary user's threshold by for the margin: a factor of at least
    ``1 + m`` for the harm bet, at most ``1 + m`` for the non-inferiority bet."""
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    steps = math.log1p(margin) / log_ratio
    return math.ceil(steps - 1e-9) if harm else math.floor(steps + 1e-9)


def bound_levels(margin: float, log_ratio: float) -> dict[str, tuple[int, float]]:
    """Per extra harm bet (keyed by its shift): the canary's shift and the harm it bounds.

    The harm bet at shift ``t`` rejects every harm ``h`` with ``1 + h <= g^t``, so when it fires
    the harm is above ``g^t - 1``.
    """
    base = margin_shift(margin, log_ratio)
    return {
        str(base + step): (base + step, math.expm1((base + step) * log_ratio))
        for step in BOUND_STEPS
    }


@dataclass(frozen=True, slots=True)
class ControlHistory:
    """Control's closed time buckets on one dense bucket axis, cumulative over time.

    ``ends`` are the buckets' end times (sorted); row ``j`` of ``cumulative`` sums buckets
    ``0..j-1`` (row 0 is zero); column ``c`` is histogram bucket ``first_index + c``.
    """

    ends: FloatArray
    cumulative: IntArray
    first_index: int

    @classmethod
    def from_buckets(
        cls, buckets: Sequence[tuple[float, Mapping[int, int]]], *, bucket_s: float
    ) -> ControlHistory:
        """From (bucket start in epoch seconds, {histogram index: count}) pairs."""
        buckets = sorted(buckets, key=lambda item: item[0])
        indices = [index for _, counts in buckets for index in counts]
        if not indices:
            return cls(np.zeros(0), np.zeros((1, 0), dtype=np.int64), 0)
        first = min(indices)
        dense = np.zeros((len(buckets) + 1, max(indices) - first + 1), dtype=np.int64)
        for row, (_, counts) in enumerate(buckets, start=1):
            for index, count in counts.items():
                dense[row, index - first] += count
        ends = np.array([start + bucket_s for start, _ in buckets], dtype=np.float64)
        return cls(ends, np.cumsum(dense, axis=0), first)


def thresholds(
    history: ControlHistory,
    first_seen: ArrayLike,
    *,
    p: float,
    lookback_s: float = DEFAULT_LOOKBACK_S,
    min_requests: int | None = None,
) -> tuple[IntArray, NDArray[np.bool_]]:
    """Per user, control's p-quantile bucket before its first request, and whether it has one.

    The window is control's buckets that ended at or before ``first_seen``: at least the last
    ``lookback_s`` seconds, and further back until it holds ``min_requests`` requests.
    """
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    t = np.asarray(first_seen, dtype=np.float64)
    need = default_min_requests(p) if min_requests is None else min_requests
    index = np.zeros(t.shape, dtype=np.int64)
    found = np.zeros(t.shape, dtype=bool)
    if not t.size or not history.ends.size:
        return index, found
    totals = history.cumulative.sum(axis=1)
    high = np.searchsorted(history.ends, t, side="right")
    by_time = np.searchsorted(history.ends, t - lookback_s, side="right")
    # The latest start j with totals[high] - totals[j] >= need (-1 when there is none).
    by_count = np.searchsorted(totals, totals[high] - need, side="right") - 1
    low = np.clip(np.minimum(by_time, by_count), 0, None)
    found = (totals[high] - totals[low]) >= max(need, 1)
    pairs, inverse = np.unique(
        np.stack([low[found], high[found]], axis=1), axis=0, return_inverse=True
    )
    if len(pairs):
        counts = history.cumulative[pairs[:, 1]] - history.cumulative[pairs[:, 0]]
        cumulative = np.cumsum(counts, axis=1)
        rank = np.maximum(np.ceil(p * cumulative[:, -1] - 1e-9), 1)
        column = np.argmax(cumulative >= rank[:, None], axis=1)
        index[found] = (column + history.first_index)[inverse.reshape(-1)]
    return index, found


@dataclass(frozen=True, slots=True)
class UserLatencies:
    """Users' latency bucket counts, flattened: entry ``j`` is ``count[j]`` requests of user
    ``user[j]`` in bucket ``index[j]``; ``total`` is each user's number of latencies."""

    user: IntArray
    index: IntArray
    count: FloatArray
    total: FloatArray

    @classmethod
    def from_counts(cls, buckets: Sequence[Mapping[int, int]]) -> UserLatencies:
        sizes = [len(counts) for counts in buckets]
        user = np.repeat(np.arange(len(buckets), dtype=np.int64), sizes)
        index = np.fromiter((i for c in buckets for i in c), dtype=np.int64, count=sum(sizes))
        count = np.fromiter(
            (n for c in buckets for n in c.values()), dtype=np.float64, count=sum(sizes)
        )
        total = np.bincount(user, weights=count, minlength=len(buckets)).astype(np.float64)
        return cls(user, index, count, total)

    def shares(self, threshold: ArrayLike, *, inclusive: bool = False) -> FloatArray:
        """Per user, the share of its latencies in buckets above (or at, with ``inclusive``)
        its threshold bucket; 0 for a user with no latency."""
        limits = np.asarray(threshold, dtype=np.int64) - (1 if inclusive else 0)
        if limits.size != self.total.size:
            raise ValueError("need one threshold per user")
        above = np.where(self.index > limits[self.user], self.count, 0.0)
        slow = np.bincount(self.user, weights=above, minlength=self.total.size)
        return np.asarray(
            np.where(self.total > 0, slow / np.maximum(self.total, 1.0), 0.0), dtype=np.float64
        )


def exceedance_shares(
    buckets: Sequence[Mapping[int, int]], threshold: ArrayLike, *, inclusive: bool = False
) -> FloatArray:
    """Per user, the share of its latencies in buckets above (or at, with ``inclusive``) its
    threshold bucket; 0 for a user with no latency (`UserLatencies.shares`)."""
    return UserLatencies.from_counts(buckets).shares(threshold, inclusive=inclusive)


@dataclass(frozen=True, slots=True)
class UserQuantileBets:
    """The betting states of one (quantile guardrail, arm) pair, and what the report shows.

    ``relative_effect`` is the contemporaneous effect on the p-quantile (the canary's over
    control's reweighted to the canary's time profile, minus one); ``threshold_ms`` the upper
    edge of the latest control threshold bucket. ``bounds`` holds, per extra harm bet of
    `bound_levels`, the harm ``h`` it bounds and its log e-value (windows averaged).
    ``outcome`` names what a user's share is taken of (its requests' latencies, or its
    generative answers' TTFTs: the same test on another histogram).
    """

    bets: UserRateBets
    quantile: float
    shift: int
    threshold_ms: float = math.nan
    relative_effect: float = math.nan
    bounds: tuple[tuple[float, float], ...] = ()
    outcome: str = "requests"


def quantile_user_evidence(
    spec: GuardrailSpec, arm: str, bets: UserQuantileBets, *, alpha: float
) -> GuardrailEvidence:
    """Harm / non-inferiority decision of a lower-is-better quantile guardrail on users."""
    if spec.kind != "quantile" or spec.quantile != bets.quantile:
        raise ValueError(f"{spec.metric_key}: not the quantile these bets were placed on")
    evidence = rate_evidence(spec, arm, bets.bets, alpha=alpha)
    windows = " + ".join(f"{w:g} s" for w in bets.bets.windows_s)
    threshold = (
        f"control's p{bets.quantile * 100:g} before its first request"
        if math.isnan(bets.threshold_ms)
        else f"control's recent p{bets.quantile * 100:g} (latest {bets.threshold_ms:.1f} ms)"
    )
    method = (
        f"{METHOD}; user outcome = share of its {bets.outcome} within {windows} slower than "
        f"{threshold}, x (1 + margin) for the canary"
    )
    effect = bets.relative_effect
    lower, interval = evidence.harm_lower_bound, evidence.interval
    if evidence.status is GuardrailStatus.HARM:
        # A larger harm only lowers every canary user's share, so each user's bet factor and
        # the wealth fall with it: the bets are nested and the largest firing one bounds the
        # harm at the same alpha (the inversion of the exceedance e-process, in harm steps).
        fired = [harm for harm, log_e in bets.bounds if log_e >= evidence.threshold]
        lower = max([lower, *fired])
        interval = (lower, interval[1])
    return dataclasses.replace(
        evidence,
        relative_effect=effect,
        harm_estimate=effect,
        harm_lower_bound=lower,
        interval=interval,
        method=method,
    )
