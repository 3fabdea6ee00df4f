"""Experiments prepared for proxying: their arms, and the decisions already made.

A ``Plan`` is built once per experiment and routing snapshot (``PlanBook``), so a request
finds its upstream, breaker, metrics and response headers ready, and a unit's decision is
remembered after its first request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from routing.proxy import metrics as proxy_metrics
from routing.proxy.breaker import CircuitBreaker
from routing.proxy.cache import PredictionCache
from routing.proxy.headers import ACTION_UNIT, REQUEST_HEADER_ACTIONS
from routing.proxy.inputs import InputPlan, input_plan
from routing.proxy.predictions import QualityPlan, quality_plan
from routing.proxy.upstream import Upstream
from routing.route import Decision, ExperimentRoute
from routing.snapshot import RoutingSnapshot

# Units whose decision a plan remembers (see Plan.decided); past this many it starts over.
# About 100 bytes per unit.
MAX_REMEMBERED_UNITS: Final = 100_000


@dataclass(slots=True, eq=False)
class Arm:
    """One variant of one experiment, with everything a request needs precomputed."""

    key: str
    upstream: Upstream
    is_control: bool
    breaker: CircuitBreaker
    metrics: proxy_metrics.ArmMetrics
    response_headers: tuple[tuple[bytes, bytes], ...]
    # Prices per million (input, output) tokens, for the cost of generative answers.
    prices: tuple[float, float] | None = None

    @property
    def base_url(self) -> str:
        return self.upstream.base_url


# What a decision means to the proxy: the arm that serves the unit, whether the unit is in the
# experiment (its exposure is recorded) and the decision's reason.
Outcome = tuple[Arm, bool, str]


@dataclass(slots=True)
class Plan:
    """An experiment prepared for proxying; rebuilt when the snapshot changes."""

    route: ExperimentRoute
    experiment_id: int
    key: str
    unit_source: str
    unit_attribute: str
    unit_header: bytes
    # REQUEST_HEADER_ACTIONS, plus ACTION_UNIT for the unit header when the unit comes from one
    # (unless that header has an action of its own; then the unit is looked up separately).
    header_actions: dict[bytes, int]
    arms: dict[str, Arm]
    control: Arm
    shadows: tuple[Arm, ...]
    fallback_to_control: bool
    compare_field: str
    cache: PredictionCache | None
    fallback_header: tuple[bytes, bytes]
    # Assignment probability of each routed variant (control's also under ""), for the rate
    # guardrails' per-user windows (``routing.observe.unit_outcomes``); None when users cannot
    # be bet on (no assignment spec, or a step where control or every canary gets nothing).
    shares: dict[str, float] | None = None
    # Model-quality tracking (request ids, predictions); None when it is off.
    quality: QualityPlan | None = None
    # Input drift (watched request fields); None when it is off.
    inputs: InputPlan | None = None
    # Decisions already made for this route, by unit: an index into ``outcomes``. The route
    # is immutable and decide() pure, so a remembered decision is exact; the plan, and with
    # it this memory, is rebuilt with every new snapshot. decide() (hashing the unit) is the
    # largest single part of the proxy's own work per request, about a quarter of it on the
    # benchmark, and a unit usually sends more than one request. A dict of strings and ints
    # is invisible to the cyclic garbage collector.
    decided: dict[str, int] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)

    def decide(self, unit: str | None) -> Outcome:
        """``route.decide(unit)`` as (arm served, in experiment, reason), remembered per unit."""
        if unit is None:
            return self.outcomes[self._index(self.route.decide(None))]
        index = self.decided.get(unit)
        if index is None:
            index = self._index(self.route.decide(unit))
            if len(self.decided) >= MAX_REMEMBERED_UNITS:
                self.decided.clear()
            self.decided[unit] = index
        return self.outcomes[index]

    def _index(self, decision: Decision) -> int:
        outcome = (self.arms[decision.variant], decision.in_experiment, decision.reason)
        try:
            return self.outcomes.index(outcome)
        except ValueError:
            self.outcomes.append(outcome)
            return len(self.outcomes) - 1


class PlanBook:
    """The plans of the current snapshot, with the breakers, upstreams and caches they share.

    Breakers, upstreams (one per base URL) and caches (one per experiment) outlive snapshots,
    so a new snapshot neither resets a failing upstream's breaker nor empties a cache.
    """

    def __init__(self, *, breaker_failures: int, breaker_cooldown_s: float) -> None:
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.breakers: dict[str, CircuitBreaker] = {}
        self._upstreams: dict[str, Upstream] = {}
        self._caches: dict[int, PredictionCache] = {}
        self._plans: dict[str, Plan] = {}
        self._snapshot: RoutingSnapshot | None = None

    def get(self, snapshot: RoutingSnapshot, experiment_key: str) -> Plan | None:
        """The plan of a running (or otherwise routed) experiment in ``snapshot``, or None."""
        if snapshot is not self._snapshot:
            self._plans = {}
            self._snapshot = snapshot
        plan = self._plans.get(experiment_key)
        if plan is None:
            route = snapshot.route(experiment_key)
            if route is None:
                return None
            plan = self._plans[experiment_key] = self._build(route)
        return plan

    def _breaker(self, upstream: str) -> CircuitBreaker:
        breaker = self.breakers.get(upstream)
        if breaker is None:
            breaker = self.breakers[upstream] = CircuitBreaker(
                upstream,
                failure_threshold=self.breaker_failures,
                cooldown_s=self.breaker_cooldown_s,
                on_change=proxy_metrics.set_breaker_state,
            )
            proxy_metrics.set_breaker_state(upstream, breaker.state)
        return breaker

    def _upstream(self, base_url: str) -> Upstream:
        upstream = self._upstreams.get(base_url)
        if upstream is None:
            upstream = self._upstreams[base_url] = Upstream(base_url)
        return upstream

    def _build(self, route: ExperimentRoute) -> Plan:
        view = route.view
        key_bytes = view.key.encode()
        arms: dict[str, Arm] = {}
        for variant in view.variants:
            base_url = variant.upstream_url.rstrip("/")
            arms[variant.key] = Arm(
                key=variant.key,
                upstream=self._upstream(base_url),
                is_control=variant.is_control,
                breaker=self._breaker(base_url),
                metrics=proxy_metrics.arm_metrics(view.key, variant.key),
                response_headers=(
                    (b"x-rampart-experiment", key_bytes),
                    (b"x-rampart-variant", variant.key.encode()),
                ),
                prices=variant.prices,
            )
        cache = None
        if view.cache_ttl_s > 0:
            cache = self._caches.get(view.id)
            if (
                cache is None
                or cache.ttl_s != view.cache_ttl_s
                or cache.max_entries != max(1, view.cache_max_entries)
            ):
                cache = PredictionCache(ttl_s=view.cache_ttl_s, max_entries=view.cache_max_entries)
            self._caches[view.id] = cache
        else:
            self._caches.pop(view.id, None)
        control = arms[route.control.key]
        unit_header = view.unit_attribute.lower().encode("latin-1")
        header_actions = REQUEST_HEADER_ACTIONS
        if view.unit_source == "header" and unit_header not in REQUEST_HEADER_ACTIONS:
            header_actions = {**REQUEST_HEADER_ACTIONS, unit_header: ACTION_UNIT}
        shares: dict[str, float] | None = None
        spec = route.spec
        if spec is not None:
            total = sum(spec.weights)
            shares = {
                key: w / total for key, w in zip(spec.variant_keys, spec.weights, strict=True)
            }
            shares[""] = shares.get(route.control.key, 0.0)
            if not 0 < shares[""] < 1:
                shares = None
        return Plan(
            route=route,
            experiment_id=view.id,
            key=view.key,
            unit_source=view.unit_source,
            unit_attribute=view.unit_attribute,
            unit_header=unit_header,
            header_actions=header_actions,
            arms=arms,
            control=control,
            shadows=tuple(arms[shadow.key] for shadow in route.shadows),
            fallback_to_control=view.fallback_to_control,
            compare_field=view.shadow_compare_field,
            cache=cache,
            fallback_header=(b"x-rampart-served-by", control.key.encode()),
            shares=shares,
            quality=quality_plan(view),
            inputs=input_plan(view),
        )
