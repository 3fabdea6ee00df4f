"""Local evaluation: decide in-process from the edge's /v1/config, with the edge's own code.

``LocalEvaluator`` (a background thread) and ``AsyncLocalEvaluator`` (an asyncio task)
fetch ``GET /v1/config`` once at start, then poll it every ``refresh_s`` seconds with
``If-None-Match``; an unchanged config costs a 304 and no parsing. Each experiment is
compiled into a ``routing.assignment.AssignmentSpec`` built from the document's bucket
``ranges``, and ``decide`` follows the steps of ``routing.edge``'s docstring: a fixed
variant (not running, rolled back, completed), then ``routing.assignment.assign`` (override,
namespace, hash and bucket). So a local decision equals the edge's for every unit id,
including non-ASCII and emoji ids (hashed as UTF-16 code units, like GrowthBook's
JavaScript SDK).

A config change reaches the process within one poll interval. A failed poll keeps the last
config and is retried at the next interval (``stats.failed`` counts them).

Exposures (``track_exposures=True``, the default): the edge records an exposure for every
decision it answers with ``in_experiment``, and analysis counts only units with one. So a
local decision with ``in_experiment`` queues the exposure (experiment, unit, variant, time
of the decision), and a background flusher (``routing.sdk.client.BatchFlusher``, the one
that sends ``Client.track``'s events) posts the queue to ``POST /v1/exposures`` every
``exposure_flush_interval_s`` seconds, or as soon as ``exposure_batch_size`` are waiting;
``flush()`` sends now, ``close()`` (the end of the ``with`` block) sends what is left.
  * Repeated decisions send nothing. Each experiment remembers unit -> variant of the
    exposures taken for sending, in two generations of plain dicts holding about
    ``exposure_cache_size`` units in all (the least recently decided forgotten first); a
    remembered unit costs ``decide`` one dict lookup. A unit decided again before the
    flusher ran is queued again and the flusher drops the repeat; a forgotten unit is sent
    again and the edge stores it once.
  * Failures: connection errors and 5xx answers are retried (``retry``), then the batch
    goes back to the queue for the next flush. The queue holds at most
    ``max_buffered_exposures``; past that, new exposures are dropped, counted
    (``exposure_stats.dropped``) and logged, and their units queued again when next decided.
  * The edge checks each exposure against its own decision and refuses, by position, those
    it would not have recorded; that happens around a config change, while this process or
    the edge has not caught up (a canary step moves units between arms). The refused ones
    are dropped and counted (``exposure_stats.rejected``), the rest sent again at once.
  * An edge without ``/v1/exposures`` (404) turns reporting off for this evaluator, with one
    error logged: its units would be missing from the analysis.
  * Without ``start()`` (``refresh()`` called by hand) nothing is sent in the background:
    exposures wait for ``flush()`` or ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import httpx

from routing.assignment import AssignmentSpec, Namespace, assign
from routing.sdk._transport import (
    RetryPolicy,
    auth_headers,
    connection_error,
    is_retryable,
    json_body,
    json_request_body,
)
from routing.sdk.client import (
    AsyncBatchFlusher,
    BatchFlusher,
    acall_with_retries,
    call_with_retries,
)
from routing.sdk.errors import ApiError, BadRequestError, NotFoundError, RampartError
from routing.sdk.records import MAX_UNIT_LENGTH, Decision, fast_decision

logger = logging.getLogger("routing.sdk")

CONFIG_FORMAT: Final = 1
REASON_INVALID_CONFIG: Final = "invalid_config"

EXPOSURES_PATH: Final = "/v1/exposures"
# The exposures API's limit per batch (routing.exposures_api.MAX_EXPOSURES_PER_BATCH).
MAX_EXPOSURES_PER_BATCH: Final = 10_000
DEFAULT_EXPOSURE_BATCH_SIZE: Final = 1000
DEFAULT_EXPOSURE_FLUSH_INTERVAL_S: Final = 1.0
# About 100 bytes a remembered unit (dict slot and unit id): ~10 MB at most.
DEFAULT_EXPOSURE_CACHE_SIZE: Final = 100_000
DEFAULT_MAX_BUFFERED_EXPOSURES: Final = 100_000
# At most one warning per this many seconds for dropped or refused exposures.
_LOG_INTERVAL_S: Final = 10.0

# (experiment key, unit id, variant key, time of the decision in Unix seconds)
Exposure = tuple[str, str, str, float]
_FIELDS: Final = 4


class LocalRoute:
    """One experiment of the config document, ready for decisions; immutable."""

    __slots__ = ("_fixed", "_spec", "_upstreams", "control", "is_running", "key")

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.key: str = entry["key"]
        self.control: str = entry["control"]
        self._upstreams: dict[str, str] = {
            item["key"]: item["upstream"] for item in (*entry["variants"], *entry["shadows"])
        }
        self._spec: AssignmentSpec | None = None
        fixed = entry["fixed"]
        self._fixed: Decision | None = None
        if fixed is not None:
            self._fixed = self._decision_template(fixed["variant"], fixed["reason"])
        else:
            try:
                self._spec = _spec_from_entry(entry)
            except (ValueError, KeyError, TypeError) as exc:
                # The edge serves control for a configuration it cannot build; do the same.
                logger.error("rampart: experiment %s: cannot evaluate locally: %s", self.key, exc)
                self._fixed = self._decision_template(self.control, REASON_INVALID_CONFIG)
        self.is_running = self._fixed is None

    def _decision_template(self, variant: str, reason: str) -> Decision:
        return Decision(self.key, "", variant, False, reason, self._upstreams.get(variant, ""))

    def decide(self, unit: str) -> Decision:
        """The edge's decision for ``unit`` (a valid unit id); pure, no I/O."""
        fixed = self._fixed
        if fixed is not None:
            return fast_decision(self.key, unit, fixed.variant, False, fixed.reason, fixed.upstream)
        outcome = assign(self._spec, unit)  # type: ignore[arg-type]
        variant = outcome.variant_key
        if variant is None:
            variant = self.control
        return fast_decision(
            self.key, unit, variant, outcome.in_experiment, outcome.reason, self._upstreams[variant]
        )

    def decider(self, exposures: ExposureQueue | None) -> Callable[[str], Decision]:
        """``decide``, or with ``exposures`` a copy of it that also queues the exposure of a
        unit in the experiment unless it was sent already.

        The copy is a closure, not a call around ``decide``: it runs for every local
        decision, and closure cells are cheaper to read than attributes. A unit already sent
        costs one dict lookup more than ``decide``; a new one the append of its exposure.
        """
        spec = self._spec
        if exposures is None or spec is None:
            return self.decide  # a fixed variant: never in the experiment, nothing to send
        key = self.key
        control = self.control
        upstreams = self._upstreams
        sent_variant = exposures.seen_units(key).recent.get
        pending = exposures.pending
        queue = pending.extend
        queue_limit = exposures.max_buffered * _FIELDS
        wake_at = (exposures.batch_size - 1) * _FIELDS
        drop = exposures.drop
        wake = exposures.wake
        now = time.time

        def decide_and_track(unit: str) -> Decision:
            outcome = assign(spec, unit)
            variant = outcome.variant_key
            if variant is None:
                variant = control
            # "is not": a config's variant keys are the very strings ``take`` remembers,
            # so identity suffices; after a config change a remembered unit is queued once
            # more, and ``take`` drops it as a repeat.
            elif outcome.in_experiment and sent_variant(unit) is not variant:
                size = len(pending)
                if size < queue_limit:
                    # One extend, atomic under the GIL: racing deciders keep the four
                    # fields of each exposure together.
                    queue((key, unit, variant, now()))
                    if size == wake_at:
                        wake()
                else:
                    drop(1, "the exposure queue is full")
            return fast_decision(
                key, unit, variant, outcome.in_experiment, outcome.reason, upstreams[variant]
            )

        return decide_and_track


def _spec_from_entry(entry: Mapping[str, Any]) -> AssignmentSpec:
    variants = entry["variants"]
    namespace = entry["namespace"]
    return AssignmentSpec(
        experiment_key=entry["key"],
        seed=entry["seed"],
        hash_version=int(entry["hash_version"]),
        variant_keys=tuple(item["key"] for item in variants),
        weights=tuple(float(item["weight"]) for item in variants),
        coverage=float(entry["coverage"]),
        namespace=(
            None
            if namespace is None
            else Namespace(namespace["id"], float(namespace["start"]), float(namespace["end"]))
        ),
        overrides=dict(entry["overrides"]),
        ranges=tuple(
            tuple((float(start), float(end)) for start, end in item["ranges"]) for item in variants
        ),
    )


class LocalConfig:
    """A /v1/config document compiled for decisions; immutable.

    With ``exposures``, decisions queue the exposures of units in an experiment there.
    """

    __slots__ = ("deciders", "routes", "version")

    def __init__(self, document: Mapping[str, Any], exposures: ExposureQueue | None = None) -> None:
        if document.get("format") != CONFIG_FORMAT:
            raise RampartError(
                f"unsupported /v1/config format {document.get('format')!r} "
                f"(this SDK reads format {CONFIG_FORMAT})"
            )
        self.version: int = int(document["version"])
        self.routes: dict[str, LocalRoute] = {
            entry["key"]: LocalRoute(entry) for entry in document["experiments"]
        }
        # Bound methods, looked up once: decide() is the hot path of local evaluation.
        self.deciders: dict[str, Callable[[str], Decision]] = {
            key: route.decider(exposures) for key, route in self.routes.items()
        }


def _unit_id(unit: Any) -> str:
    """The unit id as the edge accepts it (same rules, same errors)."""
    if unit is None or unit == "":
        raise BadRequestError(400, "invalid", "unit is required", field="unit")
    if isinstance(unit, bool) or not isinstance(unit, str | int):
        raise BadRequestError(400, "invalid", "unit must be a string", field="unit")
    text = unit if isinstance(unit, str) else str(unit)
    if len(text) > MAX_UNIT_LENGTH:
        raise BadRequestError(
            400,
            "invalid",
            f"unit is longer than {MAX_UNIT_LENGTH} characters",
            field="unit",
        )
    return text


@dataclass(frozen=True, slots=True)
class PollStats:
    """Config fetches since start: new documents, 304 answers, failed polls."""

    fetched: int
    not_modified: int
    failed: int


# --- exposures ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExposureResult:
    """What the edge did with the exposures one ``flush`` sent.

    ``accepted``: recorded (the edge stores each (experiment, unit, variant) once);
    ``ignored``: units on an override list, which the edge does not count; ``rejected``:
    refused because the edge decides the unit differently now (see the module docstring).
    """

    accepted: int = 0
    ignored: int = 0
    rejected: int = 0

    def __add__(self, other: ExposureResult) -> ExposureResult:
        return ExposureResult(
            self.accepted + other.accepted,
            self.ignored + other.ignored,
            self.rejected + other.rejected,
        )


@dataclass(frozen=True, slots=True)
class ExposureStats:
    """Exposures of one evaluator: waiting now, and totals since it was created.

    ``buffered`` counts a unit decided several times before a flush each time (the flusher
    sends it once). ``dropped`` counts exposures never sent: the queue was full, the edge
    refused a whole batch (401, 403, 413), reporting was off, or they were still queued
    when sending failed at ``close()``.
    """

    buffered: int
    accepted: int
    ignored: int
    rejected: int
    dropped: int


class SeenUnits:
    """The units of one experiment whose exposure was taken for sending: unit -> variant.

    Two generations of plain dicts that ``ExposureQueue`` turns over, rather than an LRU
    OrderedDict: a dict holding only strings is invisible to the cyclic garbage collector.
    Only the flusher writes them; ``decide`` reads ``recent``.
    """

    __slots__ = ("older", "recent")

    def __init__(self) -> None:
        self.recent: dict[str, str] = {}
        self.older: dict[str, str] = {}


class ExposureQueue:
    """Exposures waiting to be sent, oldest first, and the units already sent.

    Work is split so that ``decide`` does the least of it. ``decide`` skips a unit whose
    variant ``recent`` holds (one dict lookup), and otherwise appends the exposure to
    ``pending``: one flat list, four items per exposure (experiment, unit, variant, Unix
    seconds of the decision), so it holds no tuples for the garbage collector to traverse,
    and ``list.extend`` of a tuple is a copy of four pointers (a deque's costs twice as
    much). ``take``, in the flusher, drops repeats (a unit decided again before the flusher
    ran, or found in ``older``) and records the rest in ``recent``; growing a large dict
    costs a cache miss or two per insertion, which ``decide`` does not pay.

    Threads: an ``extend`` is atomic under the GIL, so the four fields of an exposure stay
    together and the hot path takes no lock; only the flusher removes, from the front
    (racing deciders can at most pass the bound by a few exposures).
    """

    def __init__(
        self, *, batch_size: int, cache_size: int, max_buffered: int, wake: Callable[[], None]
    ) -> None:
        self.batch_size = batch_size
        self.max_buffered = max_buffered
        self.generation_size = max(cache_size // 2, 1)
        self.wake = wake
        self.pending: list[str | float] = []
        self.sending = True
        self.accepted = 0
        self.ignored = 0
        self.rejected = 0
        self.dropped = 0
        # Batches that failed and will be sent again; already recorded as seen, so they
        # must not pass through the repeat check of ``take`` a second time.
        self._retry: list[Exposure] = []
        self._remembered = 0
        self._by_experiment: dict[str, SeenUnits] = {}
        self._last_log = 0.0

    def __len__(self) -> int:
        return len(self.pending) // _FIELDS + len(self._retry)

    @property
    def stats(self) -> ExposureStats:
        return ExposureStats(
            buffered=len(self),
            accepted=self.accepted,
            ignored=self.ignored,
            rejected=self.rejected,
            dropped=self.dropped,
        )

    def seen_units(self, experiment: str) -> SeenUnits:
        """The units sent in ``experiment``: one object for the evaluator's lifetime, so
        that a new config keeps what the previous one remembered."""
        seen = self._by_experiment.get(experiment)
        if seen is None:
            seen = self._by_experiment.setdefault(experiment, SeenUnits())
        return seen

    def take(self, count: int) -> list[Exposure]:
        """Remove up to ``count`` exposures to send, oldest first, skipping repeats."""
        batch = self._retry[:count]
        del self._retry[:count]
        while len(batch) < count:
            raw = self._remove((count - len(batch)) * _FIELDS)
            if not raw:
                break
            self._keep_new(raw, batch)
        return batch

    def _remove(self, items: int) -> list[Any]:
        """The first ``items`` items of ``pending`` (fewer if it holds fewer), removed."""
        pending = self.pending
        items = min(items, len(pending) // _FIELDS * _FIELDS)
        # Slice, then delete: deciders append at the end meanwhile, never at the front.
        raw = pending[:items]
        del pending[:items]
        return raw

    def _keep_new(self, raw: list[Any], batch: list[Exposure]) -> None:
        """Append to ``batch`` the exposures of ``raw`` not sent yet; remember them."""
        by_experiment = self._by_experiment
        for position in range(0, len(raw), _FIELDS):
            experiment, unit, variant, at = raw[position : position + _FIELDS]
            seen = by_experiment.get(experiment) or self.seen_units(experiment)
            recent = seen.recent
            if recent.get(unit) == variant:
                continue
            recent[unit] = variant
            if seen.older.get(unit) != variant:
                batch.append((experiment, unit, variant, at))
            self._remembered += 1
            if self._remembered >= self.generation_size:
                self._turn_over()

    def _turn_over(self) -> None:
        """Forget the older generation; the recent one becomes it."""
        self._remembered = 0
        for seen in list(self._by_experiment.values()):
            # The same dict objects stay: routes hold ``recent.get``.
            seen.older.clear()
            seen.older.update(seen.recent)
            seen.recent.clear()

    def put_back(self, batch: Sequence[Exposure]) -> None:
        """Queue a batch that could not be sent for the next flush, as much as fits."""
        room = max(self.max_buffered - len(self), 0)
        self._retry[:0] = batch[:room]
        if len(batch) > room:
            self.drop(len(batch) - room, "the exposure queue is full")

    def discard(self) -> int:
        """Drop every queued exposure; returns how many."""
        left = len(self._remove(len(self.pending))) // _FIELDS + len(self._retry)
        self._retry.clear()
        self.dropped += left
        return left

    def drop(self, count: int, cause: str) -> None:
        self.dropped += count
        self._log(f"rampart: {count} exposure(s) dropped ({cause}); {self.dropped} in all")

    def stop_sending(self, error: ApiError) -> None:
        """Turn reporting off: the edge has no exposures API. Decisions still queue (the
        bounded queue is the cheapest way to ignore them); ``flush`` discards."""
        self.sending = False
        self.discard()
        logger.error(
            "rampart: the edge does not serve POST %s (%s); exposures of local decisions are "
            "not reported, so analysis will not count these units",
            EXPOSURES_PATH,
            error,
        )

    def without_refused(self, batch: list[Exposure], error: RampartError) -> list[Exposure] | None:
        """``batch`` minus the exposures ``error`` refuses by position, or None if the error
        is not such a refusal (400 ``invalid_exposure``)."""
        if not isinstance(error, BadRequestError) or error.code != "invalid_exposure":
            return None
        listed = error.payload.get("error", {}).get("errors")
        if isinstance(listed, list):
            positions = {item.get("index") for item in listed if isinstance(item, dict)}
        else:
            positions = {error.index}
        refused = {p for p in positions if isinstance(p, int) and 0 <= p < len(batch)}
        if not refused:
            return None
        self.rejected += len(refused)
        self._log(
            f"rampart: the edge refused {len(refused)} exposure(s) (the first: {error.message}); "
            "this follows a config change that this process or the edge has not caught up with"
        )
        return [exposure for position, exposure in enumerate(batch) if position not in refused]

    def failed(self, batch: list[Exposure], error: RampartError) -> None:
        """Deal with a batch that could not be sent: queue it again if retrying may help."""
        if is_retryable(error):
            self.put_back(batch)
        elif isinstance(error, NotFoundError) and error.field is None:
            self.dropped += len(batch)
            self.stop_sending(error)
        else:
            self.dropped += len(batch)

    def sent(self, payload: Any, rejected: int) -> ExposureResult:
        """Count the edge's answer to a batch."""
        try:
            result = ExposureResult(
                accepted=int(payload["accepted"]),
                ignored=int(payload["ignored"]),
                rejected=rejected,
            )
        except (KeyError, TypeError, ValueError):
            raise RampartError(
                f"unexpected answer from POST {EXPOSURES_PATH}: {str(payload)[:200]}"
            ) from None
        self.accepted += result.accepted
        self.ignored += result.ignored
        return result

    def _log(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL_S:
            self._last_log = now
            logger.warning(message)


def exposures_body(batch: Sequence[Exposure]) -> bytes:
    """A batch as ``POST /v1/exposures`` takes it."""
    return json_request_body(
        {
            "exposures": [
                {"experiment": experiment, "unit_id": unit, "variant": variant, "timestamp": at}
                for experiment, unit, variant, at in batch
            ]
        }
    )


def _check_exposure_settings(
    batch_size: int, flush_interval_s: float, cache_size: int, max_buffered: int
) -> None:
    if not 1 <= batch_size <= MAX_EXPOSURES_PER_BATCH:
        raise ValueError(f"exposure_batch_size must lie in [1, {MAX_EXPOSURES_PER_BATCH}]")
    if flush_interval_s <= 0:
        raise ValueError("exposure_flush_interval_s must be positive")
    if cache_size < 2:
        raise ValueError("exposure_cache_size must be at least 2")
    if max_buffered < batch_size:
        raise ValueError("max_buffered_exposures must be at least exposure_batch_size")


# --- evaluators ---------------------------------------------------------------------------


class _Evaluator:
    """Decisions from the installed config; shared by the sync and async evaluators."""

    def __init__(self, refresh_s: float, exposures: ExposureQueue | None) -> None:
        if refresh_s <= 0:
            raise ValueError("refresh_s must be positive")
        self.refresh_s = refresh_s
        self._exposures = exposures
        self._config: LocalConfig | None = None
        # The installed config's deciders, read once per decision (decide's hot path).
        self._deciders: dict[str, Callable[[str], Decision]] = {}
        self._etag: str | None = None
        self._fetched = 0
        self._not_modified = 0
        self._failed = 0

    @property
    def version(self) -> int | None:
        """The config version in use (None before the first fetch)."""
        config = self._config
        return None if config is None else config.version

    @property
    def etag(self) -> str | None:
        return self._etag

    @property
    def stats(self) -> PollStats:
        return PollStats(self._fetched, self._not_modified, self._failed)

    @property
    def exposure_stats(self) -> ExposureStats:
        """Exposures queued, sent and lost (all zero when ``track_exposures`` is off)."""
        exposures = self._exposures
        return ExposureStats(0, 0, 0, 0, 0) if exposures is None else exposures.stats

    @property
    def experiments(self) -> list[str]:
        """Keys of the experiments in the config, sorted."""
        return sorted(self._loaded().routes)

    def decide(self, experiment: str, unit: str | int) -> Decision:
        """The variant ``unit`` gets in ``experiment``, decided in-process.

        Raises NotFoundError for an unknown experiment and BadRequestError for a missing,
        non-string or too long unit id, as the edge answers them.
        """
        try:
            decide = self._deciders[experiment]
        except KeyError:
            raise self._unknown(experiment) from None
        if type(unit) is str and 0 < len(unit) <= MAX_UNIT_LENGTH:
            return decide(unit)
        return decide(_unit_id(unit))

    def decide_all(
        self, unit: str | int, experiments: Iterable[str] | None = None
    ) -> dict[str, Decision]:
        """Decisions for ``unit`` in the given experiments, or in every running one."""
        config = self._loaded()
        if experiments is None:
            keys = sorted(key for key, route in config.routes.items() if route.is_running)
        else:
            keys = list(experiments)
        return {key: self.decide(key, unit) for key in keys}

    def _unknown(self, experiment: str) -> RampartError:
        if self._config is None:
            return RampartError("the local evaluator has no config yet: start it first")
        return NotFoundError(
            404, "not_found", f"unknown experiment {experiment!r}", field="experiment"
        )

    def _loaded(self) -> LocalConfig:
        config = self._config
        if config is None:
            raise RampartError("the local evaluator has no config yet: start it first")
        return config

    def _conditional_headers(self) -> dict[str, str]:
        return {} if self._etag is None else {"If-None-Match": self._etag}

    def _install(self, response: httpx.Response) -> bool:
        """Take a /v1/config answer; True when a new document was installed."""
        if response.status_code == 304:
            self._not_modified += 1
            return False
        config = LocalConfig(json_body(response), self._exposures)
        # One assignment each: a concurrent decide() sees the old or the new config whole.
        self._config = config
        self._deciders = config.deciders
        self._etag = response.headers.get("etag")
        self._fetched += 1
        return True

    def _poll_failed(self, error: Exception) -> None:
        self._failed += 1
        logger.warning("rampart: config poll failed (still on version %s): %s", self.version, error)

    def _unsent_at_close(self, exposures: ExposureQueue, error: RampartError) -> None:
        # close() runs on the way out, often in a finally block: it logs instead of raising.
        left = exposures.discard()
        logger.error("rampart: exposures not sent at close (%d dropped): %s", left, error)


def _exposure_queue(
    track: bool,
    batch_size: int,
    flush_interval_s: float,
    cache_size: int,
    max_buffered: int,
    wake: Callable[[], None],
) -> ExposureQueue | None:
    if not track:
        return None
    _check_exposure_settings(batch_size, flush_interval_s, cache_size, max_buffered)
    return ExposureQueue(
        batch_size=batch_size, cache_size=cache_size, max_buffered=max_buffered, wake=wake
    )


class LocalEvaluator(_Evaluator):
    """Local evaluation in a synchronous program; polls /v1/config from a daemon thread.

    Use as ``with LocalEvaluator(url, key) as evaluator: evaluator.decide(...)``, or call
    ``start()`` and ``close()``. ``decide`` is thread-safe and does no I/O; with
    ``track_exposures`` a daemon thread sends exposures (see the module docstring).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        refresh_s: float = 5.0,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        track_exposures: bool = True,
        exposure_batch_size: int = DEFAULT_EXPOSURE_BATCH_SIZE,
        exposure_flush_interval_s: float = DEFAULT_EXPOSURE_FLUSH_INTERVAL_S,
        exposure_cache_size: int = DEFAULT_EXPOSURE_CACHE_SIZE,
        max_buffered_exposures: int = DEFAULT_MAX_BUFFERED_EXPOSURES,
    ) -> None:
        self._flusher = BatchFlusher(
            self.flush,
            interval_s=exposure_flush_interval_s,
            name="rampart-exposure-flush",
            what="exposures",
        )
        super().__init__(
            refresh_s,
            _exposure_queue(
                track_exposures,
                exposure_batch_size,
                exposure_flush_interval_s,
                exposure_cache_size,
                max_buffered_exposures,
                self._flusher.wake,
            ),
        )
        self.retry = retry or RetryPolicy()
        self.exposure_batch_size = exposure_batch_size
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=auth_headers(api_key),
            timeout=timeout_s,
            transport=transport,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One batch in flight at a time: a refusal's resend or a retry never races a flush.
        self._send_lock = threading.Lock()

    def start(self) -> LocalEvaluator:
        """Fetch the config (retrying as ``retry`` says; raises if it cannot), then poll."""
        if self._thread is not None:
            return self
        retries = 0
        while True:
            try:
                self.refresh()
                break
            except RampartError as error:
                if retries >= self.retry.max_retries or not is_retryable(error):
                    raise
                self._stop.wait(self.retry.delay_s(retries))
                retries += 1
        self._thread = threading.Thread(
            target=self._poll_forever, name="rampart-config-poll", daemon=True
        )
        self._thread.start()
        if self._exposures is not None:
            self._flusher.start()
        return self

    def refresh(self) -> bool:
        """Poll /v1/config once now; True when the config changed. Raises on failure."""
        try:
            response = self._http.get("/v1/config", headers=self._conditional_headers())
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        return self._install(response)

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except RampartError as error:
                self._poll_failed(error)

    def flush(self) -> ExposureResult:
        """Send every queued exposure now; what the edge did with them.

        Raises the error of the first batch that failed (after retries); a batch that may
        succeed later is queued again, see the module docstring for the others.
        """
        exposures = self._exposures
        if exposures is None:
            return ExposureResult()
        with self._send_lock:
            if not exposures.sending:
                exposures.discard()
                return ExposureResult()
            total = ExposureResult()
            while batch := exposures.take(self.exposure_batch_size):
                total += self._send(exposures, batch)
            return total

    def _send(self, exposures: ExposureQueue, batch: list[Exposure]) -> ExposureResult:
        rejected = 0
        while True:
            try:
                payload = call_with_retries(
                    self._http, self.retry, "POST", EXPOSURES_PATH, exposures_body(batch)
                )
                return exposures.sent(payload, rejected)
            except RampartError as error:
                kept = exposures.without_refused(batch, error)
                if kept is None:
                    exposures.failed(batch, error)
                    raise
            rejected += len(batch) - len(kept)
            batch = kept
            if not batch:
                return ExposureResult(rejected=rejected)

    def close(self) -> None:
        """Stop polling, send the queued exposures (logging a failure), close HTTP."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._flusher.stop()
        exposures = self._exposures
        try:
            if exposures is not None:
                try:
                    self.flush()
                except RampartError as error:
                    self._unsent_at_close(exposures, error)
        finally:
            self._http.close()

    def __enter__(self) -> LocalEvaluator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncLocalEvaluator(_Evaluator):
    """Local evaluation in an asyncio program; polls /v1/config from a background task.

    Use as ``async with AsyncLocalEvaluator(url, key) as evaluator: evaluator.decide(...)``.
    ``decide`` is a plain method: it does no I/O; with ``track_exposures`` a task of the
    loop that ran ``start()`` sends exposures (see the module docstring).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        refresh_s: float = 5.0,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        track_exposures: bool = True,
        exposure_batch_size: int = DEFAULT_EXPOSURE_BATCH_SIZE,
        exposure_flush_interval_s: float = DEFAULT_EXPOSURE_FLUSH_INTERVAL_S,
        exposure_cache_size: int = DEFAULT_EXPOSURE_CACHE_SIZE,
        max_buffered_exposures: int = DEFAULT_MAX_BUFFERED_EXPOSURES,
    ) -> None:
        self._flusher = AsyncBatchFlusher(
            self.flush,
            interval_s=exposure_flush_interval_s,
            name="rampart-exposure-flush",
            what="exposures",
        )
        super().__init__(
            refresh_s,
            _exposure_queue(
                track_exposures,
                exposure_batch_size,
                exposure_flush_interval_s,
                exposure_cache_size,
                max_buffered_exposures,
                self._flusher.wake,
            ),
        )
        self.retry = retry or RetryPolicy()
        self.exposure_batch_size = exposure_batch_size
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=auth_headers(api_key),
            timeout=timeout_s,
            transport=transport,
        )
        self._task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    async def start(self) -> AsyncLocalEvaluator:
        """Fetch the config (retrying as ``retry`` says; raises if it cannot), then poll."""
        if self._task is not None:
            return self
        retries = 0
        while True:
            try:
                await self.refresh()
                break
            except RampartError as error:
                if retries >= self.retry.max_retries or not is_retryable(error):
                    raise
                await asyncio.sleep(self.retry.delay_s(retries))
                retries += 1
        self._task = asyncio.create_task(self._poll_forever(), name="rampart-config-poll")
        if self._exposures is not None:
            self._flusher.start()
        return self

    async def refresh(self) -> bool:
        """Poll /v1/config once now; True when the config changed. Raises on failure."""
        try:
            response = await self._http.get("/v1/config", headers=self._conditional_headers())
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        return self._install(response)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except RampartError as error:
                self._poll_failed(error)

    async def flush(self) -> ExposureResult:
        """Send every queued exposure now; what the edge did with them (see
        ``LocalEvaluator.flush``)."""
        exposures = self._exposures
        if exposures is None:
            return ExposureResult()
        async with self._send_lock:
            if not exposures.sending:
                exposures.discard()
                return ExposureResult()
            total = ExposureResult()
            while batch := exposures.take(self.exposure_batch_size):
                total += await self._send(exposures, batch)
            return total

    async def _send(self, exposures: ExposureQueue, batch: list[Exposure]) -> ExposureResult:
        rejected = 0
        while True:
            try:
                payload = await acall_with_retries(
                    self._http, self.retry, "POST", EXPOSURES_PATH, exposures_body(batch)
                )
                return exposures.sent(payload, rejected)
            except asyncio.CancelledError:
                # aclose() cancelled the flusher mid-send; the edge stores an exposure once,
                # so sending the batch again is harmless.
                exposures.put_back(batch)
                raise
            except RampartError as error:
                kept = exposures.without_refused(batch, error)
                if kept is None:
                    exposures.failed(batch, error)
                    raise
            rejected += len(batch) - len(kept)
            batch = kept
            if not batch:
                return ExposureResult(rejected=rejected)

    async def aclose(self) -> None:
        """Stop polling, send the queued exposures (logging a failure), close HTTP."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flusher.stop()
        exposures = self._exposures
        try:
            if exposures is not None:
                try:
                    await self.flush()
                except RampartError as error:
                    self._unsent_at_close(exposures, error)
        finally:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncLocalEvaluator:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
