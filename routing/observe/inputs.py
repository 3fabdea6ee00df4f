"""Per-bucket counts of watched request fields, written off the hot path (input drift).

The proxy counts a sampled user once per window in this process (``first_in_window``: one set
of the window's users' hashes per experiment, replaced when the window changes, at most
``cap`` users; then the window's later new users are dropped and counted, cause
``users_cap``) and hands the user's cells to ``claim`` (one list append; no lock, because
claiming and ``take`` both run on the event loop's thread).

Once per user and window across processes: every ``RECORDER_FLUSH_S`` the background task
takes the claims on the loop and hands them to a thread that, in one transaction, inserts an
``InputDriftClaim`` (experiment, window start, user hash) per claim with ``ON CONFLICT DO
NOTHING ... RETURNING`` (PostgreSQL; SQLite >= 3.35) and counts only the cells of the users
whose claim it inserted into one ``InputDriftBucket`` row per (experiment, field, bucket) (a
field keeps at most ``MAX_CELLS`` distinct cells per bucket; more become ``(other)``); once
more on ``stop()``. A user another process claimed first in the window is not counted again.
Claims are deleted ``CLAIM_KEEP_S`` after their window ends (an indexed DELETE per flush),
so the table holds about the sampled users of the current windows. While the database is
unreachable the claims are kept and retried after a capped backoff
(``routing.observe.backoff``); past ``MAX_CLAIMS`` waiting the oldest are dropped and counted
(``rampart_input_drift_dropped_total{cause="buffer_full"}``). Claims of an experiment deleted
meanwhile are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Final

import orjson
from django.conf import settings
from django.db import DatabaseError, transaction
from prometheus_client import Counter

from routing.db import close_thread_connections, insert_returning, run_with_db
from routing.models import InputDriftBucket, InputDriftClaim
from routing.observe.backoff import Backoff, FailureLog
from routing.observe.in_flight import InFlight

logger = logging.getLogger(__name__)

MAX_CELLS: Final = 50
MAX_CLAIMS: Final = 100_000
OTHER: Final = "(other)"
# Claims are kept this long after their window's end (then deleted by the flush).
CLAIM_KEEP_S: Final = 3600.0
CLAIM_INSERT_BATCH: Final = 250
Key = tuple[int, str, float]
# field path -> cell -> count, for one experiment and bucket
Cells = dict[str, dict[str, int]]
# (experiment, window start, window end, user hash, bucket start, field paths, their cells)
Claim = tuple[int, float, float, int, float, tuple[str, ...], tuple[str, ...]]

INPUTS_COUNTED = Counter(
    "rampart_input_drift_values_total", "Watched request-field values counted for input drift"
)
INPUTS_DROPPED = Counter(
    "rampart_input_drift_dropped_total", "Input-drift counts dropped", ["cause"]
)


def count(cells: Cells, path: str, cell: str) -> None:
    """Add one value of field `path` to an open bucket (at most MAX_CELLS cells per field)."""
    found = cells.get(path)
    if found is None:
        found = cells[path] = {}
    n = found.get(cell)
    if n is not None:
        found[cell] = n + 1
    elif len(found) < MAX_CELLS:
        found[cell] = 1
    else:
        found[OTHER] = found.get(OTHER, 0) + 1


class InputRecorder:
    """Sampled users' cells per window, claimed and counted in bulk from a background thread."""

    def __init__(self, *, flush_s: float | None = None) -> None:
        self.flush_s = float(settings.RECORDER_FLUSH_S if flush_s is None else flush_s)
        self._backoff = Backoff(
            base_s=float(settings.RECORDER_BACKOFF_BASE_S),
            max_s=float(settings.RECORDER_BACKOFF_MAX_S),
        )
        self._failure_log = FailureLog(
            logger, "writing input counts", interval_s=float(settings.RECORDER_FAILURE_LOG_S)
        )
        # Users counted by this process, waiting for the next flush to claim them.
        self._claims: list[Claim] = []
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight: InFlight[None] = InFlight()
        # experiment -> (window, hashes of the users counted in it by this process).
        self._users: dict[int, tuple[object, set[int]]] = {}

    def first_in_window(self, experiment_id: int, window: object, user: int, cap: int) -> bool:
        """Whether `user` is new in `experiment_id`'s `window` (then remembered; event loop)."""
        current = self._users.get(experiment_id)
        if current is None or current[0] != window:
            current = self._users[experiment_id] = (window, set())
        seen = current[1]
        if user in seen:
            return False
        if len(seen) >= cap:
            INPUTS_DROPPED.labels("users_cap").inc()
            return False
        seen.add(user)
        return True

    def claim(self, claim: Claim) -> None:
        """A user's cells in its window, to be counted if no process claimed it (event loop)."""
        if len(self._claims) >= MAX_CLAIMS:
            INPUTS_DROPPED.labels("buffer_full").inc()
            return
        self._claims.append(claim)

    def take(self) -> list[Claim]:
        """Every claim waiting (event loop only)."""
        pending, self._claims = self._claims, []
        return pending

    def give_back(self, pending: list[Claim]) -> None:
        """Claims a failed flush could not write, before newer ones (event loop only)."""
        merged = pending + self._claims
        if len(merged) > MAX_CLAIMS:
            INPUTS_DROPPED.labels("buffer_full").inc(len(merged) - MAX_CLAIMS)
            merged = merged[-MAX_CLAIMS:]
        self._claims = merged

    @property
    def buffered(self) -> int:
        return len(self._claims)

    def flush_now(self) -> int:
        """Take and write everything in the calling thread (tests; no loop running)."""
        pending = self.take()
        try:
            return write(pending)
        except DatabaseError:
            self.give_back(pending)
            raise

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rampart-inputs")
        self._task = asyncio.create_task(self._run(), name="rampart-input-flush")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._in_flight.wait()
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        pending = self.take()
        try:
            await loop.run_in_executor(executor, run_with_db, partial(write, pending))
        except DatabaseError as error:
            logger.error("stopped with input counts unwritten (%s)", type(error).__name__)
        finally:
            await loop.run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._backoff.current_s or self.flush_s)
            await self._in_flight.run(self._flush())

    async def _flush(self) -> None:
        pending = self.take()
        if not pending:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, run_with_db, partial(write, pending)
            )
        except Exception as error:  # the database being down must not stop the loop
            self.give_back(pending)
            delay = self._backoff.failed()
            self._failure_log.failed(error, f"counts kept, next attempt in {delay:.1f} s")
            return
        if self._backoff.failures:
            self._backoff.succeeded()
            self._failure_log.succeeded("input counts written again")


def counts_of(claims: list[Claim]) -> dict[Key, dict[str, int]]:
    """The claims' cells summed per (experiment, field, bucket), MAX_CELLS per field."""
    by_bucket: dict[tuple[int, float], Cells] = {}
    for experiment_id, _, _, _, bucket, paths, cells in claims:
        found = by_bucket.get((experiment_id, bucket))
        if found is None:
            found = by_bucket[experiment_id, bucket] = {}
        for path, cell in zip(paths, cells, strict=True):
            count(found, path, cell)
    return {
        (experiment_id, path, bucket): cells
        for (experiment_id, bucket), found in by_bucket.items()
        for path, cells in found.items()
    }


def _insert_claims(claims: list[Claim]) -> set[tuple[int, float, int]]:
    """Insert the claims, skipping those already there; the keys this call inserted."""
    inserted = insert_returning(
        InputDriftClaim._meta.db_table,
        ("experiment_id", "window_start", "window_end", "user_hash"),
        [claim[:4] for claim in claims],
        batch=CLAIM_INSERT_BATCH,
        unique=("experiment_id", "window_start", "user_hash"),
        returning=("experiment_id", "window_start", "user_hash"),
    )
    return {(int(e), float(w), int(u)) for e, w, u in inserted}


def write(pending: list[Claim], *, now: float | None = None) -> int:
    """Claim the users and write the counts of those this call claimed, in one transaction;
    returns the bucket rows written (claims of deleted experiments dropped). First deletes the
    claims of windows that ended more than CLAIM_KEEP_S before `now`."""
    if not pending:
        return 0
    experiment_field = InputDriftBucket._meta.get_field("experiment")
    experiments = experiment_field.related_model._default_manager  # type: ignore[union-attr]
    cutoff = (time.time() if now is None else now) - CLAIM_KEEP_S
    with transaction.atomic():
        # In the transaction: a failed flush is retried whole, none of its claims kept.
        InputDriftClaim.objects.filter(window_end__lt=cutoff).delete()
        ids = {claim[0] for claim in pending}
        alive = set(experiments.filter(pk__in=ids).values_list("pk", flat=True))
        unique: dict[tuple[int, float, int], Claim] = {}
        for claim in pending:
            if claim[0] not in alive:
                INPUTS_DROPPED.labels("experiment_gone").inc()
                continue
            unique.setdefault((claim[0], claim[1], claim[3]), claim)
        # In key order, so that two processes' flushes wait on each other without deadlocking.
        won = _insert_claims([unique[key] for key in sorted(unique)])
        counted = [claim for key, claim in unique.items() if key in won]
        counts = counts_of(counted)
        InputDriftBucket.objects.bulk_create(
            InputDriftBucket(
                experiment_id=experiment_id,
                field_path=path,
                bucket_start=bucket,
                counts=orjson.dumps(cells).decode(),
            )
            for (experiment_id, path, bucket), cells in counts.items()
        )
    INPUTS_COUNTED.inc(sum(sum(cells.values()) for cells in counts.values()))
    return len(counts)
