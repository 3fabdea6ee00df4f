"""The exposures API: ``POST /v1/exposures`` records exposures of units decided in an SDK.

Mounted on the edge at ``/v1/exposures`` (``build_edge(mounts={"/v1/exposures":
ExposuresApp})``). An SDK that decides in-process (``rampart_sdk.LocalEvaluator``) reports
here the exposures the edge would have recorded had it answered the decision itself, so
analysis counts locally decided units like any other.

Request
-------
``POST /v1/exposures`` with an API key holding the ``decide`` or the ``sdk`` scope
(``Authorization: Bearer rk_...`` or ``X-Rampart-Key``; not checked when
``EDGE_REQUIRE_KEY`` is false; ``sdk`` keys are GrowthBook client keys, whose tracking
callbacks post here, see ``routing.edge.features_api``) and
the body ``{"exposures": [exposure, ...]}``, at most ``MAX_EXPOSURES_PER_BATCH`` of them::

    {"experiment": "ranker-v2",         # key of a running experiment
     "unit_id": "u-42",                 # string (or integer), 1-200 characters
     "variant": "v2",                   # key of the variant the unit was served
     "timestamp": 1714564800.25}        # optional: when the unit was served, ISO 8601
                                        # with an offset or epoch seconds; default: now

No other fields are accepted. The edge recomputes every decision from its routing snapshot
(``ExperimentRoute.decide``) and takes an exposure only if the edge itself would have
recorded it: the unit is in the experiment (``in_experiment``) and gets that variant. So a
client cannot put units into an arm, or into the analysis, that the assignment did not put
there. Units in the experiment's ``overrides`` are allowlisted QA traffic, which the edge
never counts: they are not refused whatever variant is named, and not recorded.

Browsers may call it from any origin (``Access-Control-Allow-Origin: *``, and ``OPTIONS``
answers the CORS preflight): the key travels in a header, never in a cookie.

Answer
------
``202 {"accepted": n, "ignored": m}``: n exposures were handed to the edge's exposure
recorder (the same buffered ``ExposureRecorder`` that ``/v1/decide`` writes through: first
exposure per (experiment, unit, variant) wins, written within ``RECORDER_FLUSH_S``); m named
overridden units. Sending a batch again is harmless: the unique (experiment, unit, variant)
row is written once. A timestamp later than the time of receipt, by at most
``EDGE_MAX_CLOCK_SKEW_S`` (default 300 s, a client clock running ahead), is taken as the
time of receipt (an exposure cannot be seen before it happened); a later one is refused.

Errors are problem details (``application/problem+json``; codes in docs/errors.md). The
batch is validated whole against one snapshot before anything is recorded; any invalid
exposure refuses the whole batch::

    400 {"type": "urn:rampart:problem:validation_error", "title": "Invalid input",
         "status": 400, "code": "validation_error", "index": 3, "field": "variant",
         "detail": "exposure 3: unit 'u-7' gets variant 'v1' of experiment 'ranker-v2', not 'v2'",
         "errors": [{"index": 3, "field": "variant", "code": "validation_error",
                     "message": "..."}, ...],
         "batch_size": 120}

``index`` and ``field`` name the first invalid exposure; ``errors`` lists every one, so a
client can drop them all and send the rest in one more request. Fields: ``experiment``
(missing, unknown, not running), ``unit_id`` (missing, bad, not in the experiment: outside
its coverage or namespace), ``variant`` (missing, not a variant of the experiment, not the
unit's), ``timestamp`` (bad, or beyond the clock skew), or an unknown field's name (code
``unknown_field``); ``field`` is null when the exposure is not an object. Refusals of a
correct SDK happen only around a config change, while its config or the edge's snapshot
lags the other (a canary step moves units between arms). So a batch refused only for such
conflicts has the edge confirm its config version first (``routing.edge.context.confirm_snapshot``):
if a newer snapshot comes in, the batch is checked once more against it; if the version
cannot be confirmed (database unreachable), the answer is 503 ``experiment_not_on_edge`` with
``Retry-After`` rather than a refusal the SDK would drop. Other errors: 400
``malformed_json``, ``invalid_encoding``, ``unknown_field`` or ``validation_error`` (the
body's shape, or more than ``MAX_EXPOSURES_PER_BATCH`` exposures), 401/403 (key), 404, 405
(not POST), 413 ``payload_too_large`` (a body over ``MAX_EXPOSURES_BODY_BYTES``), 503
``not_ready`` (no routing snapshot yet).

Validation runs in a worker thread, so a batch of 10,000 (about 60 ms of Python: the edge
recomputes each decision) does not hold up the decisions the event loop is answering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import orjson
from prometheus_client import Counter

from routing.edge.asgi import (
    CORS_HEADERS,
    Receive,
    Scope,
    Send,
    method_not_allowed,
    not_ready_error,
    send_error,
    send_json,
    send_preflight,
    send_problem,
)
from routing.edge.batch import (
    ASSIGNMENT_CONFLICT,
    TimestampParser,
    batch_refusal,
    check_scope,
    latest_timestamp,
    parse_batch,
    read_limited_body,
    text_field,
    unit_id_field,
    unknown_fields,
)
from routing.edge.context import (
    SCOPE_DECIDE,
    SCOPE_SDK,
    EdgeContext,
    confirm_snapshot,
    not_on_edge_error,
)
from routing.edge.problems import EdgeError, FieldError
from routing.route import ExperimentRoute
from routing.snapshot import RoutingSnapshot

logger = logging.getLogger(__name__)

MOUNT_PATH: Final = "/v1/exposures"
MAX_EXPOSURES_PER_BATCH: Final = 10_000
# 10,000 exposures of the longest allowed keys and unit ids take about 4 MB of JSON.
MAX_EXPOSURES_BODY_BYTES: Final = 8 * 1024 * 1024
# Experiment and variant keys are slugs of at most 64 characters; longer cannot match.
MAX_KEY_LENGTH: Final = 64
EXPOSURE_FIELDS: Final = frozenset({"experiment", "unit_id", "variant", "timestamp"})
REASON_OVERRIDE: Final = "override"

EXPOSURES_ACCEPTED = Counter(
    "rampart_exposure_api_accepted_total",
    "Exposures accepted by POST /v1/exposures and handed to the exposure recorder.",
)
EXPOSURES_IGNORED = Counter(
    "rampart_exposure_api_ignored_total",
    "Exposures of overridden (allowlisted) units, accepted by POST /v1/exposures, not counted.",
)
EXPOSURES_REJECTED = Counter(
    "rampart_exposure_api_rejected_total",
    "Exposures in batches POST /v1/exposures refused as a whole because one was invalid.",
)
REQUESTS_REJECTED = Counter(
    "rampart_exposure_api_requests_rejected_total",
    "Requests to POST /v1/exposures answered with an error, by error code.",
    ["code"],
)


class AcceptedExposure(NamedTuple):
    """An exposure to record (a named tuple: 10,000 of them are built per batch)."""

    experiment_id: int
    unit_id: str
    variant_key: str
    at: datetime


@dataclass(frozen=True, slots=True)
class ValidatedExposures:
    """A valid batch: the exposures to record, and how many named overridden units."""

    accepted: list[AcceptedExposure]
    ignored: int


def validate_exposures(
    body: bytes,
    *,
    snapshot: RoutingSnapshot,
    now: datetime,
    max_exposures: int = MAX_EXPOSURES_PER_BATCH,
) -> ValidatedExposures:
    """Parse and check a request body against ``snapshot``; records nothing.

    Raises EdgeError: bad JSON or shape, or a 400 listing every invalid exposure by
    ``index`` (``batch_refusal``; ``extra["batch_size"]`` holds the batch's size). ``now``
    (aware, UTC) is the timestamp of exposures that carry none, and the latest one an
    exposure is recorded with; one more than ``EDGE_MAX_CLOCK_SKEW_S`` later is refused.
    """
    items = parse_batch(body, name="exposures", max_items=max_exposures, allow_list=False)
    check = _ExposureCheck(snapshot, now)
    accepted: list[AcceptedExposure] = []
    errors: list[dict[str, Any]] = []
    ignored = 0
    for index, item in enumerate(items):
        try:
            exposure = check(item)
        except FieldError as error:
            errors.append(error.entry(index))
            continue
        if exposure is None:
            ignored += 1
        else:
            accepted.append(exposure)
    if errors:
        refusal = batch_refusal(errors, "exposure")
        refusal.extra = {"batch_size": len(items)}
        raise refusal
    return ValidatedExposures(accepted=accepted, ignored=ignored)


class _ExposureCheck:
    """Checks one exposure of a batch; None for an overridden unit (valid, not counted)."""

    def __init__(self, snapshot: RoutingSnapshot, now: datetime) -> None:
        self.snapshot = snapshot
        self.now = now
        self.parse_time = TimestampParser(latest=latest_timestamp(now))

    def __call__(self, item: Any) -> AcceptedExposure | None:
        if type(item) is not dict:
            raise FieldError(None, "each exposure must be a JSON object")
        if not EXPOSURE_FIELDS.issuperset(item):
            raise unknown_fields(item, EXPOSURE_FIELDS)
        route = self._route(item.get("experiment"))
        unit = unit_id_field(item.get("unit_id"))
        variant = text_field("variant", item.get("variant"), MAX_KEY_LENGTH)
        try:
            route.variant(variant)
        except KeyError:
            raise FieldError(
                "variant",
                f"experiment {route.key!r} has no variant {variant!r}",
                ASSIGNMENT_CONFLICT,
            ) from None
        raw_time = item.get("timestamp")
        at = self.now if raw_time is None else min(self.parse_time(raw_time), self.now)
        decision = route.decide(unit)
        if decision.reason == REASON_OVERRIDE:
            return None
        if not decision.in_experiment:
            raise FieldError(
                "unit_id",
                f"unit {unit!r} is not in experiment {route.key!r} ({decision.reason}); "
                "the edge records no exposure for it",
                ASSIGNMENT_CONFLICT,
            )
        if decision.variant != variant:
            raise FieldError(
                "variant",
                f"unit {unit!r} gets variant {decision.variant!r} of experiment "
                f"{route.key!r}, not {variant!r}",
                ASSIGNMENT_CONFLICT,
            )
        return AcceptedExposure(route.experiment_id, unit, variant, at)

    def _route(self, value: Any) -> ExperimentRoute:
        key = text_field("experiment", value, MAX_KEY_LENGTH)
        route = self.snapshot.route(key)
        if route is None:
            raise FieldError("experiment", f"unknown experiment {key!r}", ASSIGNMENT_CONFLICT)
        if not route.is_running:
            raise FieldError(
                "experiment",
                f"experiment {key!r} is not running ({route.fixed_reason}); "
                "the edge records no exposure for it",
                ASSIGNMENT_CONFLICT,
            )
        return route


def record_exposures(exposures: list[AcceptedExposure], record: Callable[..., None]) -> None:
    """Hand accepted exposures to ``record`` (``ExposureRecorder.record``)."""
    for exposure in exposures:
        record(
            experiment_id=exposure.experiment_id,
            unit_id=exposure.unit_id,
            variant_key=exposure.variant_key,
            at=exposure.at,
        )


# --- the ASGI part ------------------------------------------------------------------------


class ExposuresApp:
    """The ``/v1/exposures`` part of the edge (``routing.edge.context.SubApp``)."""

    def __init__(
        self,
        context: EdgeContext,
        *,
        max_exposures: int = MAX_EXPOSURES_PER_BATCH,
        max_body_bytes: int = MAX_EXPOSURES_BODY_BYTES,
    ) -> None:
        self.context = context
        self.max_exposures = max_exposures
        self.max_body_bytes = max_body_bytes
        self._executor: ThreadPoolExecutor | None = None

    async def startup(self) -> None:
        """Start the validation thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="rampart-exposures-api"
            )

    async def shutdown(self) -> None:
        """Finish the batches in flight, then stop the thread."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "OPTIONS" and scope["path"].rstrip("/") == MOUNT_PATH:
            # A browser's tracking callback (a GrowthBook SDK with an sdk key) preflights.
            await send_preflight(scope, send, b"POST, OPTIONS")
            return
        try:
            validated = await self._handle(scope, receive)
        except EdgeError as error:
            REQUESTS_REJECTED.labels(error.code).inc()
            if error.extra and "batch_size" in error.extra:
                EXPOSURES_REJECTED.inc(error.extra["batch_size"])
            error.headers = (*error.headers, *CORS_HEADERS)
            await send_problem(send, error)
            return
        except Exception:
            logger.exception("an exposure batch failed")
            REQUESTS_REJECTED.labels("server_error").inc()
            await send_error(
                send,
                500,
                "server_error",
                "the exposures API failed; retry",
                headers=CORS_HEADERS,
            )
            return
        await send_json(
            send,
            202,
            orjson.dumps({"accepted": len(validated.accepted), "ignored": validated.ignored}),
            CORS_HEADERS,
        )

    async def _handle(self, scope: Scope, receive: Receive) -> ValidatedExposures:
        if scope["path"].rstrip("/") != MOUNT_PATH:
            raise EdgeError(404, "not_found", f"no such endpoint: {scope['path']}")
        if scope["method"] != "POST":
            raise method_not_allowed("POST")
        context = self.context
        check_scope(context, scope, SCOPE_DECIDE, SCOPE_SDK)
        if not context.snapshots.current.loaded:
            raise not_ready_error()
        body = await read_limited_body(scope, receive, self.max_body_bytes)
        executor = self._executor
        if executor is None:
            raise not_ready_error("the exposures API has not started")
        arrived = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, self._accept, body)
        except EdgeError as refusal:
            if refusal.status != 409:
                raise
            # Only conflicts with this edge's snapshot, which may lag the SDK's config (an
            # experiment started, a ramp step taken): confirm the config version, and check
            # the batch once more if a newer snapshot came in.
            holder = context.snapshots
            checked = holder.current.version
            if not await confirm_snapshot(holder, arrived):
                raise not_on_edge_error(holder, "an experiment of these exposures") from None
            if holder.current.version == checked:
                raise
        return await loop.run_in_executor(executor, self._accept, body)

    def _accept(self, body: bytes) -> ValidatedExposures:
        # One snapshot for the whole batch: a refresh meanwhile cannot split its verdicts.
        validated = validate_exposures(
            body,
            snapshot=self.context.snapshots.current,
            now=datetime.now(UTC),
            max_exposures=self.max_exposures,
        )
        record_exposures(validated.accepted, self.context.exposures.record)
        EXPOSURES_ACCEPTED.inc(len(validated.accepted))
        EXPOSURES_IGNORED.inc(validated.ignored)
        return validated
