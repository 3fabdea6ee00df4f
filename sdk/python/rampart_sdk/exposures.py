"""Exposure reporting of the local evaluators: the queue, its counts and the request body.

Decisions queue exposures here and the evaluators of ``rampart_sdk.local`` send them; what
happens to an exposure (batching, retries, refusals, an edge without the API) is described in
``rampart_sdk.local``'s module docstring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from rampart_sdk._transport import is_retryable, json_request_body
from rampart_sdk.errors import ApiError, NotFoundError, RampartError

logger = logging.getLogger("rampart_sdk")

EXPOSURES_PATH: Final = "/v1/exposures"
# The exposures API's limit per batch (routing.edge.exposures_api.MAX_EXPOSURES_PER_BATCH).
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
FIELDS: Final = 4


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
        return len(self.pending) // FIELDS + len(self._retry)

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

    def offer(self, experiment: str, unit: str, variant: str) -> bool:
        """Queue one exposure outside ``decide`` (``Evaluator.record_exposure``), with the
        rules the deciders apply inline: a unit already sent with this variant is skipped,
        a full queue drops it, the batch size wakes the flusher. True when queued."""
        if self.seen_units(experiment).recent.get(unit) == variant:
            return False
        size = len(self.pending)
        if size >= self.max_buffered * FIELDS:
            self.drop(1, "the exposure queue is full")
            return False
        self.pending.extend((experiment, unit, variant, time.time()))
        if size == (self.batch_size - 1) * FIELDS:
            self.wake()
        return True

    def take(self, count: int) -> list[Exposure]:
        """Remove up to ``count`` exposures to send, oldest first, skipping repeats."""
        batch = self._retry[:count]
        del self._retry[:count]
        while len(batch) < count:
            raw = self._remove((count - len(batch)) * FIELDS)
            if not raw:
                break
            self._keep_new(raw, batch)
        return batch

    def _remove(self, items: int) -> list[Any]:
        """The first ``items`` items of ``pending`` (fewer if it holds fewer), removed."""
        pending = self.pending
        items = min(items, len(pending) // FIELDS * FIELDS)
        # Slice, then delete: deciders append at the end meanwhile, never at the front.
        raw = pending[:items]
        del pending[:items]
        return raw

    def _keep_new(self, raw: list[Any], batch: list[Exposure]) -> None:
        """Append to ``batch`` the exposures of ``raw`` not sent yet; remember them."""
        by_experiment = self._by_experiment
        for position in range(0, len(raw), FIELDS):
            experiment, unit, variant, at = raw[position : position + FIELDS]
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
        left = len(self._remove(len(self.pending))) // FIELDS + len(self._retry)
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
        is not such a refusal (a 400 or 409 problem whose errors name exposures by ``index``;
        or the older 400 ``invalid_exposure``)."""
        if not isinstance(error, ApiError) or error.status not in (400, 409):
            return None
        listed: Any = error.errors
        if not listed and error.code == "invalid_exposure":
            listed = error.payload.get("error", {}).get("errors")
        if isinstance(listed, list) and listed:
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


def check_exposure_settings(
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
