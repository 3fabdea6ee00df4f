"""Paired p95 latency of a shadow against control, from the per-pair ratios ``R = S / C``.

Pairs. Each user gives one pair ``(C, S)``: control's and the shadow's latency on the same
request (``routing.observe.shadow_pairs``; one pair per user across edge processes, STATS.md
12.1, so the pairs are i.i.d. draws over users). The ratio ``R = S / C`` is free of the
between-request spread (payload size, user, load), which both answers share.

Estimand. The tails of ``R`` on both sides:

* ``U = Q_R(0.95)``: on 5% of users' requests the shadow took at least ``U`` times control's
  time on the same request (the shadow's 1-in-20 slowdown);
* ``V = Q_{C/S}(0.95) = 1 / Q_R(0.05)``: on 5% of them control took at least ``V`` times the
  shadow's (control's 1-in-20 slowdown, i.e. the shadow's 1-in-20 speed-up).

The **paired p95 ratio** is ``theta = sqrt(U / V) = sqrt(Q_R(0.95) Q_R(0.05))``, the geometric
midpoint of the ratio's 5th and 95th percentiles. Why not ``U`` alone (the brief's first idea,
"on 95% of requests the shadow is at most ``U`` times control"): ``U`` counts the two servers'
own per-request noise as slowness. An identical shadow whose and control's noise on a request
are independent ``exp(N(0, s^2))`` has ``U = exp(1.645 s sqrt(2))`` (1.12 at ``s = 5%``, 1.26 at
10%), and in the end-to-end test (two identical 20 ms stand-ins on a loaded machine) ``U`` was
at least 1.27, so a "p95 +20%" tolerance on ``U`` called an identical shadow worse. ``theta``
keeps the tolerance's meaning instead:

* an identical shadow (``S`` and ``C`` exchangeable: ``R`` and ``1/R`` equally distributed)
  has ``U = V`` and ``theta = 1``, whatever the noise;
* a shadow ``k`` times slower on every request with noise symmetric in the log
  (``S = k C e``, ``log e`` symmetric) has ``U = k a``, ``V = a / k`` and ``theta = k``, which is
  also the ratio of the two p95s ``Q_S(0.95) / Q_C(0.95)`` when the noise is small against the
  between-request spread: "p95 +X%" means the same as before for a uniform slowdown;
* a shadow slower on some requests only moves ``U`` and not ``V``, so ``theta`` rises with the
  upper tail (e.g. twice as slow on a tenth of requests: ``U`` about 2, ``theta`` about 1.38
  at small noise; ``tests/analysis/stats/test_paired_quantile.py``); slowdowns on fewer than
  5% of requests leave ``U`` alone, so the mean latency and the per-arm ratio must catch those.

It is a different quantity from the ratio of the per-arm p95s (still reported, for context:
``analysis.stats.quantiles.quantile_ratio_cs``); it answers "how much slower is the shadow at
the tail of the per-request comparison, beyond what control's own tail against it shows".

Method. ``R`` is one i.i.d. sample, so each of its quantiles has the confidence sequence of
Howard & Ramdas 2022 ("Sequential estimation of quantiles with applications to A/B-testing
and best-arm identification", Bernoulli 28(3), the fixed-quantile CS of section 3 with the
beta-binomial mixture boundary of Howard, Ramdas, McAuliffe & Sekhon 2021, Ann. Statist.
49(2), section 3), read from the ratios' log histogram (``analysis.stats.quantiles.quantile_cs``):
``[L_95, U_95]`` for ``Q_R(0.95)`` and ``[L_05, U_05]`` for ``Q_R(0.05)``, each two-sided at
``alpha / 2``. By the union bound both hold at every look with probability at least
``1 - alpha``, and ``theta`` is increasing in both quantiles, so
``[sqrt(L_95 L_05), sqrt(U_95 U_05)]`` is a CS for ``theta`` at level ``alpha``: exact
(nonasymptotic), valid at every look. Bucket edges bound every ratio in a bucket, so the 1%
bucketing widens it by at most 1% per side and never narrows it.

Checks (``tests/analysis/stats/test_paired_quantile.py``): at every fixed ``n`` each
quantile's ranks contain those of the exact fixed-``n`` binomial order-statistic interval
(closed form from ``scipy.stats.binom``, :func:`order_statistic_ranks`), as a time-uniform CS
must; and in seeded simulations with a look every 20 pairs, the share of runs whose CS ever
misses the true ``theta`` stays within ``alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from analysis.stats.quantiles import LatencyHistogram, quantile_cs

UPPER_P = 0.95
LOWER_P = 0.05


@dataclass(frozen=True, slots=True)
class PairedP95:
    """``theta`` with its CS, and the two tails it is made of (point estimates)."""

    estimate: float
    lower: float
    upper: float
    slowdown: float  # U = Q_R(0.95): the shadow's 1-in-20 slowdown against control
    speedup: float  # V = 1 / Q_R(0.05): control's 1-in-20 slowdown against the shadow


def paired_p95_cs(ratios: LatencyHistogram, *, alpha: float, t_opt: float) -> PairedP95:
    """``theta = sqrt(Q_R(0.95) Q_R(0.05))`` and its CS from the log histogram of ``S / C``.

    Two-sided: ``lower <= theta <= upper`` at every look with probability at least
    ``1 - alpha``. Without pairs: nan with bounds ``(0, inf)``.
    """
    if ratios.count == 0:
        return PairedP95(math.nan, 0.0, math.inf, math.nan, math.nan)
    high_lower, high_upper = quantile_cs(ratios, UPPER_P, alpha=alpha / 2.0, t_opt=t_opt)
    low_lower, low_upper = quantile_cs(ratios, LOWER_P, alpha=alpha / 2.0, t_opt=t_opt)
    high, low = ratios.quantile(UPPER_P), ratios.quantile(LOWER_P)
    return PairedP95(
        estimate=math.sqrt(high * low),
        lower=math.sqrt(high_lower * low_lower),
        upper=math.sqrt(high_upper * low_upper),
        slowdown=high,
        speedup=1.0 / low,
    )


def order_statistic_ranks(n: int, p: float, alpha: float) -> tuple[int, int]:
    """Fixed-``n`` exact two-sided CI ``[X_(l), X_(u)]`` for ``Q(p)`` from order statistics.

    The classical binomial construction (e.g. Hahn & Meeker 1991, "Statistical Intervals",
    section 5.2): ``B = #{X_i <= Q(p)} ~ Binomial(n, p)`` for continuous ``X``, and
    ``X_(l) > Q(p)`` iff ``B <= l - 1``, ``X_(u) < Q(p)`` iff ``B >= u``; ``l`` is the largest
    and ``u`` the smallest rank leaving at most ``alpha / 2`` in its tail. Returns 0 / ``n + 1``
    where no order statistic bounds that side. The tests' closed-form reference.
    """
    binomial = stats.binom(n, p)
    ranks = np.arange(1, n + 1)
    lower_ok = ranks[binomial.cdf(ranks - 1) <= alpha / 2.0]
    upper_ok = ranks[binomial.sf(ranks - 1) <= alpha / 2.0]
    lower = int(lower_ok.max()) if lower_ok.size else 0
    upper = int(upper_ok.min()) if upper_ok.size else n + 1
    return lower, upper
