"""What every part of the edge shares: the context, the mount protocol, and finding a route.

``routing.edge.app`` builds one ``EdgeContext`` (the snapshot holder and the exposure
recorder) and hands it to each part it mounts (``SubApp``): the proxy, the events,
exposures and features APIs, the health endpoints. A part that meets an experiment key its
snapshot does not hold resolves it here (``resolve_route``), as the decision API does.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from django.conf import settings

from routing.edge.asgi import Receive, Scope, Send, api_key_from_headers
from routing.edge.problems import EdgeError
from routing.observe.recorder import ExposureRecorder
from routing.route import ExperimentRoute, KeyCheck
from routing.snapshot import SnapshotHolder

SCOPE_DECIDE: Final = "decide"
# GrowthBook client keys (routing.edge.features_api): the payload and exposures, nothing else.
SCOPE_SDK: Final = "sdk"
# Business events (routing.edge.ingest) and labels (routing.edge.labels).
SCOPE_INGEST: Final = "ingest"
# How long a request for an unknown experiment waits for the config version check.
CONFIRM_TIMEOUT_S: Final = 1.0


class SubApp(Protocol):
    """A part of the edge mounted under a path prefix (the proxy, the events API...)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...


@dataclass
class EdgeContext:
    """What every part of the edge shares: the snapshot holder and the exposure recorder."""

    snapshots: SnapshotHolder
    exposures: ExposureRecorder
    require_key: bool = field(default_factory=lambda: bool(settings.EDGE_REQUIRE_KEY))

    @classmethod
    def from_settings(cls) -> EdgeContext:
        return cls(snapshots=SnapshotHolder(), exposures=ExposureRecorder())

    def check_key(self, headers: Iterable[tuple[bytes, bytes]], scope: str) -> KeyCheck | None:
        """None when the request may proceed, else the failed check to answer with."""
        if not self.require_key:
            return None
        check = self.snapshots.current.check_key(api_key_from_headers(headers), scope)
        return None if check.ok else check


async def confirm_snapshot(holder: SnapshotHolder, since: float) -> bool:
    """True once the holder's snapshot is confirmed current as of ``since`` (monotonic).

    False when the config version could not be read within ``CONFIRM_TIMEOUT_S`` (database
    unreachable). See ``SnapshotHolder.confirm_current``.
    """
    try:
        return await asyncio.wait_for(
            holder.confirm_current(since=since), timeout=CONFIRM_TIMEOUT_S
        )
    except TimeoutError:
        return False


def not_on_edge_error(holder: SnapshotHolder, what: str) -> EdgeError:
    """503 ``experiment_not_on_edge``, with ``Retry-After`` one snapshot refresh away."""
    retry_after = max(1, math.ceil(holder.refresh_s))
    return EdgeError(
        503,
        "experiment_not_on_edge",
        f"{what} is not on this edge: its routing snapshot (version {holder.current.version}) "
        f"does not hold it and the config version could not be confirmed; retry after "
        f"{retry_after} s",
        "experiment",
        headers=((b"retry-after", str(retry_after).encode()),),
        extra={"retry_after_s": retry_after},
    )


async def resolve_route(
    context: EdgeContext, key: str, *, since: float | None = None
) -> ExperimentRoute:
    """The route of a key the current snapshot may not know yet (the slow path of a miss).

    The snapshot lags the database by up to ``SNAPSHOT_REFRESH_S``; an experiment created a
    moment ago is missing from it. So a miss first has the holder confirm the config version
    (one shared, rate-limited query, ``confirm_snapshot``): a new version is loaded and the
    key served from it; an unchanged one proves the key unknown, 404
    ``experiment_not_found``. When the version cannot be confirmed within
    ``CONFIRM_TIMEOUT_S`` (database unreachable), the experiment may exist but is not on this
    edge: 503 ``experiment_not_on_edge`` with ``Retry-After``. ``since`` (monotonic; default
    now) lets the keys of one request share one check.
    """
    holder = context.snapshots
    confirmed = await confirm_snapshot(holder, time.monotonic() if since is None else since)
    route = holder.current.route(key)
    if route is not None:
        return route
    if confirmed:
        raise EdgeError(404, "experiment_not_found", f"unknown experiment {key!r}", "experiment")
    raise not_on_edge_error(holder, f"experiment {key!r}")
