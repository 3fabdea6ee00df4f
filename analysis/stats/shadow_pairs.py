"""Paired, anytime-valid comparisons of a shadow with control on the same requests.

A shadow answers a mirrored copy of each request control answers, so every comparison is
paired: the between-request variance (payload size, user, moment) cancels in the difference.
Three families, each a two-sided confidence sequence (CS) valid at every look:

* **Mean latency**, relative: for a margin ``m`` the pair's excess ``D_m = S - (1 + m) C``
  (``S`` the shadow's latency, ``C`` control's) has mean ``E S - (1 + m) E C``. Its CS is the
  normal-mixture boundary of Howard, Ramdas, McAuliffe & Sekhon 2021 ("Time-uniform,
  nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2), section 3.2) on the
  standardised sum with the plug-in variance, which is the asymptotic CS of Waudby-Smith, Arnold,
  Wu, Howard & Ramdas 2024 ("Time-uniform central limit theory and asymptotic confidence
  sequences", Ann. Statist. 52(6), Theorem 2.2 and eq. (9)): ``mean(D) +- u(n) sd(D) / n``
  (``analysis.stats.sequential.normal_mixture_bound``). Validity is asymptotic: a burn-in of
  ``min_pairs`` pairs comes first. The CS for the ratio ``E S / E C`` inverts it (Fieller's
  construction): ``{r : 0 in CS(D_{r-1})}``, found by bisection (the bounds are monotone in r
  for positive latencies).
* **p95 latency**, paired: ``theta = sqrt(Q_R(0.95) Q_R(0.05))`` of the per-pair ratio
  ``R = S / C`` (the shadow's 1-in-20 slowdown against control, over control's against the
  shadow, square-rooted: 1 for an identical shadow whatever the noise, ``k`` for one ``k``
  times slower on every request), with the quantile CSs of Howard & Ramdas 2022 on the ratios
  (``analysis.stats.paired_quantile`` defines it and says why not ``Q_R(0.95)`` alone). The
  per-arm comparison (each latency's p95 CS at ``alpha / 2``, joined by a union
  bound: ``quantile_ratio_cs``) is still computed, for context, but takes no part in the verdict.
* **Disagreement rate** ``p`` (share of requests whose answers differ): exact, non-asymptotic.
  For a tolerance ``d``, the one-sided likelihood-ratio mixture
  ``M_n(d) = int (q/d)^x ((1-q)/(1-d))^(n-x) pi(dq)`` with ``pi`` uniform on ``(d, 1)`` (test of
  ``p <= d``) or on ``(0, d)`` (test of ``p >= d``) is a nonnegative supermartingale under the
  null (each factor has mean ``p q / d + (1-p)(1-q)/(1-d) <= 1`` on the null's side), so by
  Ville's inequality ``P(sup M_n >= 1/a) <= a``. This is Robbins' (1970, "Statistical methods
  related to the law of the iterated logarithm", Ann. Math. Statist. 41(5)) conjugate mixture
  for the Bernoulli; as a mixture over constant bets it is also a betting CS in the sense of
  Waudby-Smith & Ramdas 2024 ("Estimating means of bounded random variables by betting",
  JRSS-B 86(1), section 4). In closed form, with ``B`` the beta function and ``I`` the
  regularised incomplete beta: ``M_n = B(x+1, n-x+1) (1 - I_d(x+1, n-x+1)) / ((1-d) d^x
  (1-d)^(n-x))`` for ``p <= d``. The CS's ends are the ``d`` where each side's mixture
  reaches ``2 / alpha``.

The pairs must be independent: one per user (STATS.md 12.1). Users are sticky, so a user's
requests share inputs and payloads; where users differ in how often the shadow disagrees with
control, per-request pairs make every CS here far too narrow (in a seeded sticky world,
``tests/analysis/stats/test_shadow_pairs.py``, a per-request disagreement CS at a tolerance equal
to the true rate gave a wrong verdict in about a third of runs at alpha / 3 = 1.7%). The proxy
therefore records only each user's first mirrored request as its pair
(``routing.observe.shadow_pairs``), and the same simulation on those pairs stays within alpha.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from scipy import special

from analysis.stats.paired_quantile import paired_p95_cs
from analysis.stats.quantiles import LatencyHistogram, quantile_ratio_cs
from analysis.stats.sequential import normal_mixture_bound

Verdict = Literal["collecting", "ready", "worse"]
# Bisection range of the latency ratio E S / E C.
_MAX_RATIO = 1e4


@dataclass(frozen=True, slots=True)
class PairedLatency:
    """Sufficient statistics of the pairs: count, sums, sums of squares and cross-product."""

    n: int
    control_sum: float
    shadow_sum: float
    control_sum_sq: float
    shadow_sum_sq: float
    cross_sum: float

    def excess_moments(self, ratio: float, *, paired: bool = True) -> tuple[float, float]:
        """Mean and (population) variance of ``S - ratio * C`` over the pairs.

        ``paired=False`` leaves out the covariance of ``S`` and ``C``: the variance an unpaired
        comparison of the same values has (two independent samples of ``n``), which is all
        that separates the two tests (``bench/shadow_pairing.py``).
        """
        n = self.n
        mean_s, mean_c = self.shadow_sum / n, self.control_sum / n
        mean = mean_s - ratio * mean_c
        var_s = max(self.shadow_sum_sq / n - mean_s * mean_s, 0.0)
        var_c = max(self.control_sum_sq / n - mean_c * mean_c, 0.0)
        covariance = self.cross_sum / n - mean_s * mean_c if paired else 0.0
        return mean, max(var_s - 2.0 * ratio * covariance + ratio * ratio * var_c, 0.0)


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate and its confidence-sequence bounds (``inf`` where none exists)."""

    estimate: float
    lower: float
    upper: float

    def as_json(self) -> dict[str, float | None]:
        return {
            "estimate": _finite(self.estimate),
            "lower": _finite(self.lower),
            "upper": _finite(self.upper),
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def mean_cs(
    n: int, mean: float, variance: float, *, alpha: float, n_star: float
) -> tuple[float, float]:
    """Two-sided CS ``mean +- u(n) sd / n`` for the mean of i.i.d. values (Howard 3.2).

    ``u(n)`` bounds the standardised sum ``sum (X_i - mu) / sd`` at intrinsic time ``v = n``.
    """
    if n < 2:
        return -math.inf, math.inf
    u = normal_mixture_bound(float(n), alpha=alpha, v_opt=n_star, alpha_opt=alpha)
    half = u * math.sqrt(variance * n / (n - 1)) / n
    return mean - half, mean + half


def latency_ratio_cs(
    pairs: PairedLatency, *, alpha: float, n_star: float, paired: bool = True
) -> Interval:
    """CS for ``E S / E C`` by inverting the CS of the mean excess ``S - r C`` over ``r``.

    ``paired=False``: the same with the unpaired variance (for the benchmark's comparison).
    """
    if pairs.n < 2 or pairs.control_sum <= 0.0:
        return Interval(math.nan, 0.0, math.inf)
    estimate = pairs.shadow_sum / pairs.control_sum

    def bounds(ratio: float) -> tuple[float, float]:
        mean, variance = pairs.excess_moments(ratio, paired=paired)
        return mean_cs(pairs.n, mean, variance, alpha=alpha, n_star=n_star)

    # The lower end: the smallest r whose excess CS still reaches 0 from above (lower <= 0).
    lower = _bisect(lambda r: bounds(r)[0] <= 0.0, 0.0, estimate, increasing=True)
    # The upper end: the largest r whose excess CS reaches 0 from below (upper >= 0).
    upper = _bisect(lambda r: bounds(r)[1] >= 0.0, estimate, _MAX_RATIO, increasing=False)
    return Interval(estimate, lower, upper)


def _bisect(inside: Callable[[float], bool], low: float, high: float, *, increasing: bool) -> float:
    """The edge of ``{r : inside(r)}`` in ``[low, high]``, which ``estimate`` is inside of.

    ``increasing``: inside for r above the edge (the lower end); else below (the upper end).
    """
    if increasing and inside(low):
        return low
    if not increasing and inside(high):
        return math.inf
    for _ in range(80):
        middle = 0.5 * (low + high)
        if inside(middle) == increasing:
            high = middle
        else:
            low = middle
    return high if increasing else low


def latency_difference_cs(pairs: PairedLatency, *, alpha: float, n_star: float) -> Interval:
    """CS for the mean paired difference ``E(S - C)`` in ms."""
    if pairs.n < 2:
        return Interval(math.nan, -math.inf, math.inf)
    mean, variance = pairs.excess_moments(1.0)
    lower, upper = mean_cs(pairs.n, mean, variance, alpha=alpha, n_star=n_star)
    return Interval(mean, lower, upper)


def disagreement_log_e(disagreements: int, n: int, tolerance: float, *, above: bool) -> float:
    """Log of Robbins' one-sided Bernoulli mixture at ``tolerance`` (module docstring).

    ``above=True`` tests ``p <= tolerance`` (large values say the rate is above it);
    ``above=False`` tests ``p >= tolerance``.
    """
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if not 0 <= disagreements <= n:
        raise ValueError(f"need 0 <= disagreements <= n, got {disagreements} of {n}")
    a, b = disagreements + 1.0, n - disagreements + 1.0
    log_beta = float(special.betaln(a, b))
    log_null = disagreements * math.log(tolerance) + (n - disagreements) * math.log1p(-tolerance)
    if above:
        mass = float(special.betaincc(a, b, tolerance))
        prior = -math.log1p(-tolerance)
    else:
        mass = float(special.betainc(a, b, tolerance))
        prior = -math.log(tolerance)
    if mass <= 0.0:
        # The mixture's mass lies on the other side, beyond double precision.
        return -math.inf
    return log_beta + math.log(mass) + prior - log_null


def disagreement_cs(disagreements: int, n: int, *, alpha: float) -> Interval:
    """CS for the disagreement rate: the tolerances neither one-sided mixture rejects at alpha/2."""
    if n == 0:
        return Interval(math.nan, 0.0, 1.0)
    estimate = disagreements / n
    threshold = math.log(2.0 / alpha)

    def lower_ok(d: float) -> bool:
        return disagreement_log_e(disagreements, n, d, above=True) < threshold

    def upper_ok(d: float) -> bool:
        return disagreement_log_e(disagreements, n, d, above=False) < threshold

    tiny = 1e-12
    lower = 0.0 if lower_ok(tiny) else _bisect(lower_ok, tiny, max(estimate, tiny), increasing=True)
    upper = (
        1.0
        if upper_ok(1.0 - tiny)
        else _bisect(upper_ok, min(max(estimate, tiny), 1.0 - tiny), 1.0 - tiny, increasing=False)
    )
    return Interval(estimate, lower, upper)


@dataclass(frozen=True, slots=True)
class Tolerances:
    """How much worse than control a shadow may be and still be "ready to canary"."""

    latency_increase: float  # mean latency may rise by at most this share (0.10 = +10%)
    # The paired p95 ratio (analysis.stats.paired_quantile) may be at most 1 + this.
    p95_increase: float
    disagreement: float  # the answers may differ on at most this share of requests
    min_pairs: int  # burn-in of the asymptotic latency CS


@dataclass(frozen=True, slots=True)
class QualityPairs:
    """A quality metric's per-user (control score, shadow score) sums, with its guardrail."""

    metric: str
    name: str
    higher_is_better: bool
    margin: float  # tolerated relative harm, as the metric's guardrail margin
    pairs: PairedLatency


@dataclass(frozen=True, slots=True)
class ShadowInputs:
    """Everything the verdict reads: the pairs, the paired histograms and the comparisons."""

    pairs: PairedLatency
    control_histogram: LatencyHistogram
    shadow_histogram: LatencyHistogram
    ratio_histogram: LatencyHistogram  # of S / C per pair
    compared: int
    disagreements: int
    abs_diff_sum: float
    abs_diff_sum_sq: float
    numeric: bool
    quality: tuple[QualityPairs, ...] = ()


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """The verdict of one shadow, with every interval it rests on."""

    verdict: Verdict
    reason: str
    pairs: int
    compared: int
    latency_difference_ms: Interval
    latency_ratio: Interval
    p95_ratio: Interval  # Q_S(0.95) / Q_C(0.95), per-arm CSs (context, not in the verdict)
    # theta = sqrt(Q_R(0.95) Q_R(0.05)) of R = S / C, paired (in the verdict), and its tails:
    # (the shadow's 1-in-20 slowdown against control, control's against the shadow).
    p95_pair_ratio: Interval
    p95_pair_tails: tuple[float, float]
    disagreement: Interval
    abs_diff: Interval | None
    alpha: float
    # Per quality metric: (metric key, name, users' pairs, CS of E shadow / E control).
    quality: tuple[tuple[str, str, int, Interval], ...] = ()

    def as_json(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "pairs": self.pairs,
            "compared": self.compared,
            "alpha": self.alpha,
            "latency_difference_ms": self.latency_difference_ms.as_json(),
            "latency_ratio": self.latency_ratio.as_json(),
            "p95_ratio": self.p95_ratio.as_json(),
            "p95_pair_ratio": {
                **self.p95_pair_ratio.as_json(),
                "slowdown": _finite(self.p95_pair_tails[0]),
                "speedup": _finite(self.p95_pair_tails[1]),
            },
            "disagreement": self.disagreement.as_json(),
            "abs_diff": None if self.abs_diff is None else self.abs_diff.as_json(),
            "quality": [
                {"metric": key, "name": name, "pairs": n, "ratio": interval.as_json()}
                for key, name, n, interval in self.quality
            ],
        }


def _percent(share: float) -> str:
    return f"{share * 100:.1f}%"


def shadow_verdict(
    inputs: ShadowInputs, tolerances: Tolerances, *, alpha: float, n_star: float
) -> ShadowResult:
    """ "worse" when a CS lies beyond a tolerance, "ready" when all lie within, else "collecting".

    The families (mean and paired p95 latency, disagreement, and each quality metric paired on its
    labels) share alpha (Bonferroni), so the chance that any of the reported intervals ever
    misses its value, and hence of a wrong verdict, is at most alpha. A quality metric's
    tolerance is its guardrail margin, relative to control (accuracy may fall to
    ``(1 - margin)`` times control's; a loss may rise to ``(1 + margin)`` times).
    """
    level = alpha / (3.0 + len(inputs.quality))
    pairs = inputs.pairs
    difference = latency_difference_cs(pairs, alpha=level, n_star=n_star)
    ratio = latency_ratio_cs(pairs, alpha=level, n_star=n_star)
    if inputs.control_histogram.count and inputs.shadow_histogram.count:
        p95_lower, p95_upper = quantile_ratio_cs(
            inputs.control_histogram,
            inputs.shadow_histogram,
            p=0.95,
            alpha=level,
            t_opt=n_star,
        )
        p95_point = inputs.shadow_histogram.quantile(0.95) / inputs.control_histogram.quantile(0.95)
        p95 = Interval(p95_point, p95_lower, p95_upper)
    else:
        p95 = Interval(math.nan, 0.0, math.inf)
    paired_p95 = paired_p95_cs(inputs.ratio_histogram, alpha=level, t_opt=n_star)
    p95_pair = Interval(paired_p95.estimate, paired_p95.lower, paired_p95.upper)
    disagreement = disagreement_cs(inputs.disagreements, inputs.compared, alpha=level)
    abs_diff = None
    if inputs.numeric and inputs.compared >= 2:
        mean = inputs.abs_diff_sum / inputs.compared
        variance = max(inputs.abs_diff_sum_sq / inputs.compared - mean * mean, 0.0)
        low, high = mean_cs(inputs.compared, mean, variance, alpha=level, n_star=n_star)
        abs_diff = Interval(mean, max(low, 0.0), high)

    quality = [(q, latency_ratio_cs(q.pairs, alpha=level, n_star=n_star)) for q in inputs.quality]

    def result(verdict: Verdict, reason: str) -> ShadowResult:
        return ShadowResult(
            verdict=verdict,
            reason=reason,
            pairs=pairs.n,
            compared=inputs.compared,
            latency_difference_ms=difference,
            latency_ratio=ratio,
            p95_ratio=p95,
            p95_pair_ratio=p95_pair,
            p95_pair_tails=(paired_p95.slowdown, paired_p95.speedup),
            disagreement=disagreement,
            abs_diff=abs_diff,
            alpha=alpha,
            quality=tuple((q.metric, q.name, q.pairs.n, ratio) for q, ratio in quality),
        )

    fewest = min([pairs.n, inputs.compared, *(q.pairs.n for q in inputs.quality)])
    if fewest < tolerances.min_pairs:
        return result(
            "collecting",
            f"{fewest} of the {tolerances.min_pairs} pairs needed before a verdict",
        )
    worse: list[str] = []
    if disagreement.lower > tolerances.disagreement:
        worse.append(
            f"disagrees with control on at least {_percent(disagreement.lower)} of requests "
            f"(tolerance {_percent(tolerances.disagreement)})"
        )
    if ratio.lower > 1.0 + tolerances.latency_increase:
        worse.append(
            f"mean latency at least +{_percent(ratio.lower - 1.0)} "
            f"(tolerance +{_percent(tolerances.latency_increase)})"
        )
    if p95_pair.lower > 1.0 + tolerances.p95_increase:
        worse.append(
            f"paired p95 latency ratio at least {p95_pair.lower:.2f}x "
            f"(tolerance {1.0 + tolerances.p95_increase:.2f}x; on 5% of users' requests the "
            f"shadow took at least {paired_p95.slowdown:.2f}x control's time, and on 5% "
            f"control at least {paired_p95.speedup:.2f}x the shadow's)"
        )
    quality_ok = True
    for q, interval in quality:
        if q.higher_is_better:
            floor = 1.0 - q.margin
            if interval.upper < floor:
                worse.append(
                    f"{q.name} at most {_signed(interval.upper - 1.0)} "
                    f"(tolerance {_signed(-q.margin)})"
                )
            quality_ok = quality_ok and interval.lower > floor
        else:
            ceiling = 1.0 + q.margin
            if interval.lower > ceiling:
                worse.append(
                    f"{q.name} at least {_signed(interval.lower - 1.0)} "
                    f"(tolerance {_signed(q.margin)})"
                )
            quality_ok = quality_ok and interval.upper < ceiling
    if worse:
        return result("worse", "worse than control: " + "; ".join(worse))
    if (
        quality_ok
        and disagreement.upper < tolerances.disagreement
        and ratio.upper < 1.0 + tolerances.latency_increase
        and p95_pair.upper < 1.0 + tolerances.p95_increase
    ):
        return result(
            "ready",
            f"ready to canary: disagreement at most {_percent(disagreement.upper)}, mean latency "
            f"at most {_signed(ratio.upper - 1.0)}, paired p95 latency ratio at most "
            f"{p95_pair.upper:.2f}x",
        )
    return result("collecting", "the intervals still straddle a tolerance")


def _signed(share: float) -> str:
    return f"{'+' if share >= 0 else ''}{share * 100:.1f}%"
