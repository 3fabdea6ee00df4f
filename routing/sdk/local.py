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

Differences from asking the edge: a local decision records no exposure (the edge records
one for every decision it answers with ``in_experiment``), and a config change reaches the
process within one poll interval. A failed poll keeps the last config and is retried at the
next interval (``stats.failed`` counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
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
)
from routing.sdk.errors import BadRequestError, NotFoundError, RampartError
from routing.sdk.records import MAX_UNIT_LENGTH, Decision, fast_decision

logger = logging.getLogger("routing.sdk")

CONFIG_FORMAT: Final = 1
REASON_INVALID_CONFIG: Final = "invalid_config"


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
    """A /v1/config document compiled for decisions; immutable."""

    __slots__ = ("deciders", "routes", "version")

    def __init__(self, document: Mapping[str, Any]) -> None:
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
            key: route.decide for key, route in self.routes.items()
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


class _Evaluator:
    """Decisions from the installed config; shared by the sync and async evaluators."""

    def __init__(self, refresh_s: float) -> None:
        if refresh_s <= 0:
            raise ValueError("refresh_s must be positive")
        self.refresh_s = refresh_s
        self._config: LocalConfig | None = None
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
    def experiments(self) -> list[str]:
        """Keys of the experiments in the config, sorted."""
        return sorted(self._loaded().routes)

    def decide(self, experiment: str, unit: str | int) -> Decision:
        """The variant ``unit`` gets in ``experiment``, decided in-process.

        Raises NotFoundError for an unknown experiment and BadRequestError for a missing,
        non-string or too long unit id, as the edge answers them.
        """
        config = self._config
        if config is None:
            raise RampartError("the local evaluator has no config yet: start it first")
        decide = config.deciders.get(experiment)
        if decide is None:
            raise NotFoundError(
                404, "not_found", f"unknown experiment {experiment!r}", field="experiment"
            )
        if type(unit) is not str or not 0 < len(unit) <= MAX_UNIT_LENGTH:
            unit = _unit_id(unit)
        return decide(unit)

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
        config = LocalConfig(json_body(response))
        # One assignment each: a concurrent decide() sees the old or the new config whole.
        self._config = config
        self._etag = response.headers.get("etag")
        self._fetched += 1
        return True

    def _poll_failed(self, error: Exception) -> None:
        self._failed += 1
        logger.warning("rampart: config poll failed (still on version %s): %s", self.version, error)


class LocalEvaluator(_Evaluator):
    """Local evaluation in a synchronous program; polls /v1/config from a daemon thread.

    Use as ``with LocalEvaluator(url, key) as evaluator: evaluator.decide(...)``, or call
    ``start()`` and ``close()``. ``decide`` is thread-safe and does no I/O.
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
    ) -> None:
        super().__init__(refresh_s)
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=auth_headers(api_key),
            timeout=timeout_s,
            transport=transport,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def close(self) -> None:
        """Stop polling and close the HTTP client."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
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
    ``decide`` is a plain method: it does no I/O.
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
    ) -> None:
        super().__init__(refresh_s)
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=auth_headers(api_key),
            timeout=timeout_s,
            transport=transport,
        )
        self._task: asyncio.Task[None] | None = None

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

    async def aclose(self) -> None:
        """Stop polling and close the HTTP client."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
