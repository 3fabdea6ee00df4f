"""The routing snapshot: an immutable in-process view of every experiment and API key.

The edge answers "which version does this unit get?" from a ``RoutingSnapshot`` without
touching the database. A ``SnapshotHolder`` checks the global config version in a
background thread every ``SNAPSHOT_REFRESH_S`` seconds and, when it changed, builds a new
snapshot and swaps it in with one attribute assignment. Requests read
``holder.current`` and never wait for a check or a rebuild, so a change made through the
API reaches every edge process within about one refresh interval.

One experiment's decisions are made by its ``ExperimentRoute`` (``routing.route``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import orjson
from django.conf import settings

from experiments import selectors
from experiments.contracts import ApiKeyView, ExperimentView
from experiments.services import api_key_matches, split_api_key
from routing.db import close_thread_connections, run_with_db
from routing.observe import metrics
from routing.route import KEY_OK, ExperimentRoute, KeyCheck

logger = logging.getLogger(__name__)

CONFIG_FORMAT_VERSION: Final = 1
# Distinct raw keys whose successful check a snapshot remembers (see check_key).
_MAX_VERIFIED_KEYS: Final = 1024
# Shortest time between two version checks made for unknown experiment keys (per process).
CONFIRM_MIN_INTERVAL_S: Final = 0.05


class RoutingSnapshot:
    """All experiments and active API keys at one config version.

    Immutable, apart from two memos that only ever cache what the snapshot already
    determines: the /v1/config document and the keys that passed ``check_key``.
    """

    __slots__ = ("_by_id", "_config", "_keys", "_routes", "_verified", "built_at", "version")

    version: int
    built_at: float

    def __init__(
        self,
        *,
        version: int,
        views: Iterable[ExperimentView],
        api_keys: Iterable[ApiKeyView],
        built_at: float | None = None,
    ) -> None:
        self.version = version
        self.built_at = time.time() if built_at is None else built_at
        self._routes: Mapping[str, ExperimentRoute] = {v.key: ExperimentRoute(v) for v in views}
        self._by_id = {route.experiment_id: route for route in self._routes.values()}
        self._keys: Mapping[str, ApiKeyView] = {k.prefix: k for k in api_keys}
        self._config: tuple[bytes, str] | None = None
        self._verified: dict[str, frozenset[str]] = {}

    @classmethod
    def empty(cls) -> RoutingSnapshot:
        """The snapshot before the first load: version -1, nothing in it."""
        return cls(version=-1, views=(), api_keys=(), built_at=0.0)

    @property
    def loaded(self) -> bool:
        return self.version >= 0

    @property
    def api_key_count(self) -> int:
        return len(self._keys)

    def route(self, experiment_key: str) -> ExperimentRoute | None:
        return self._routes.get(experiment_key)

    def route_by_id(self, experiment_id: int) -> ExperimentRoute | None:
        return self._by_id.get(experiment_id)

    def routes(self) -> Iterable[ExperimentRoute]:
        return self._routes.values()

    def check_key(self, raw_key: str | None, scope: str) -> KeyCheck:
        """Is ``raw_key`` an active key with ``scope``? Hash and compare; no database query.

        Keys that passed are remembered with their scopes for the life of this snapshot
        (which ends when any key is created or revoked), so a client's repeat requests skip
        the hash; failures are not remembered, so guessing fills no memory.
        """
        scopes = self._verified.get(raw_key) if raw_key else None
        if scopes is not None:
            if scope in scopes:
                return KEY_OK
            return KeyCheck(False, 403, f"this API key lacks the {scope!r} scope")
        if not raw_key:
            return KeyCheck(False, 401, "an API key is required (Authorization: Bearer rk_...)")
        parts = split_api_key(raw_key)
        known = None if parts is None else self._keys.get(parts[0])
        if known is None or not api_key_matches(raw_key, known.key_hash):
            return KeyCheck(False, 401, "unknown or revoked API key")
        if len(self._verified) < _MAX_VERIFIED_KEYS:
            self._verified[raw_key] = known.scopes
        if scope not in known.scopes:
            return KeyCheck(False, 403, f"this API key lacks the {scope!r} scope")
        return KEY_OK

    def config_document(self) -> tuple[bytes, str]:
        """The /v1/config body and its ETag, built once per snapshot."""
        cached = self._config
        if cached is None:
            document = {
                "format": CONFIG_FORMAT_VERSION,
                "version": self.version,
                "experiments": [route.config_entry() for route in self._routes.values()],
            }
            body = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
            etag = f'"{self.version}-{hashlib.sha256(body).hexdigest()[:20]}"'
            cached = (body, etag)
            self._config = cached
        return cached


def load_snapshot() -> RoutingSnapshot:
    """Read the config version, then every experiment and active key, and build a snapshot.

    The version is read first: a change committed in between only makes the snapshot newer
    than its version says, and the next check rebuilds it.
    """
    version = selectors.config_version_current()
    views = selectors.experiment_views(
        statuses=("draft", "running", "paused", "completed", "rolled_back")
    )
    return RoutingSnapshot(version=version, views=views, api_keys=selectors.api_key_views())


def read_config_version() -> int:
    return selectors.config_version_current()


class SnapshotHolder:
    """Holds the current snapshot and refreshes it in the background.

    ``current`` is a plain attribute: reading it on the hot path costs nothing, and a
    rebuild replaces it atomically. Database work runs on one dedicated thread.
    """

    def __init__(
        self,
        *,
        refresh_s: float | None = None,
        loader: Callable[[], RoutingSnapshot] = load_snapshot,
        version_reader: Callable[[], int] = read_config_version,
    ) -> None:
        if refresh_s is None:
            refresh_s = float(settings.SNAPSHOT_REFRESH_S)
        self.refresh_s = refresh_s
        self.current: RoutingSnapshot = RoutingSnapshot.empty()
        self.last_checked_at = 0.0
        self._loader = loader
        self._version_reader = version_reader
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        # Monotonic time at which the last successful version check began: the snapshot
        # holds every change committed before then (see confirm_current).
        self.confirmed_from = -math.inf
        self._confirming: asyncio.Future[None] | None = None
        self._last_confirm_started = -math.inf

    def refresh_now(self) -> RoutingSnapshot:
        """Rebuild the snapshot now in the calling thread (start-up and tests)."""
        with self._lock:
            started = time.monotonic()
            snapshot = self._loader()
            self._install(snapshot)
            self.confirmed_from = max(self.confirmed_from, started)
            return snapshot

    def check_now(self) -> bool:
        """Rebuild if the config version changed; True if a new snapshot was installed."""
        with self._lock:
            started = time.monotonic()
            version = self._version_reader()
            if version == self.current.version:
                self._mark_checked()
                changed = False
            else:
                self._install(self._loader())
                changed = True
            self.confirmed_from = max(self.confirmed_from, started)
            return changed

    async def confirm_current(self, *, since: float) -> bool:
        """Wait until a version check begun at or after ``since`` (monotonic) has succeeded.

        For a key the snapshot does not know: once this returns True, the snapshot holds
        every change committed before ``since``, so a key still missing does not exist;
        False when the check failed (the database is unreachable) and nothing can be said.
        Checks are shared: at most one runs at a time, begun at least
        ``CONFIRM_MIN_INTERVAL_S`` after the previous one, so a flood of unknown keys costs
        the database at most one tiny query per interval per process. A version that moved
        installs the new snapshot, as the background refresh would have a moment later.
        """
        while self.confirmed_from < since:
            pending = self._confirming
            if pending is None:
                pending = self._confirming = asyncio.ensure_future(self._confirm())
            try:
                await asyncio.shield(pending)
            except Exception:
                return False
        return True

    async def _confirm(self) -> None:
        try:
            wait = self._last_confirm_started + CONFIRM_MIN_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_confirm_started = time.monotonic()
            executor = self._executor
            if executor is None:
                # Not started: only tests that call the app in their own thread, with their
                # own connection (and DJANGO_ALLOW_ASYNC_UNSAFE, as the database is then
                # read from the event loop's thread).
                self.check_now()
            else:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(executor, run_with_db, self.check_now)
        except Exception:
            metrics.SNAPSHOT_ERRORS.inc()
            logger.warning("routing snapshot: confirming the config version failed", exc_info=True)
            raise
        finally:
            self._confirming = None

    def _install(self, snapshot: RoutingSnapshot) -> None:
        previous = self.current
        self.current = snapshot
        self._mark_checked()
        metrics.SNAPSHOT_VERSION.set(snapshot.version)
        metrics.SNAPSHOT_BUILT.set(snapshot.built_at)
        metrics.SNAPSHOT_REBUILDS.inc()
        counts: dict[str, int] = dict.fromkeys(
            ("draft", "running", "paused", "completed", "rolled_back"), 0
        )
        for route in snapshot.routes():
            counts[route.view.status] = counts.get(route.view.status, 0) + 1
        for status, count in counts.items():
            metrics.SNAPSHOT_EXPERIMENTS.labels(status).set(count)
        if previous.version != snapshot.version:
            logger.info(
                "routing snapshot %s -> %s (%d experiments, %d api keys)",
                previous.version,
                snapshot.version,
                sum(counts.values()),
                snapshot.api_key_count,
            )

    def _mark_checked(self) -> None:
        self.last_checked_at = time.time()

    def age_s(self) -> float:
        """Seconds since the snapshot was last confirmed current (or built)."""
        return time.time() - self.last_checked_at if self.last_checked_at else math.inf

    async def start(self) -> None:
        """Load the first snapshot, then check the config version in the background."""
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rampart-snapshot")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, run_with_db, self.refresh_now)
        metrics.SNAPSHOT_AGE.set_function(self.age_s)
        self._task = asyncio.create_task(self._run(), name="rampart-snapshot-refresh")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        executor, self._executor = self._executor, None
        if executor is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(executor, close_thread_connections)
            executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await loop.run_in_executor(self._executor, run_with_db, self.check_now)
            except Exception:
                # The previous snapshot keeps serving; the age gauge shows how stale it is.
                metrics.SNAPSHOT_ERRORS.inc()
                logger.exception(
                    "routing snapshot refresh failed; still serving version %s",
                    self.current.version,
                )
