"""The edge's dispatch to mounted parts: longest prefix first, whole path segments only."""

from __future__ import annotations

import asyncio
from typing import Any

from routing.edge.app import build_edge
from routing.edge.asgi import Receive, Scope, Send
from routing.edge.context import EdgeContext


class Named:
    """A mounted part that records the paths it was given."""

    def __init__(self, name: str, paths: list[tuple[str, str]]) -> None:
        self.name = name
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append((self.name, scope["path"]))

    async def startup(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


def dispatch(mounts: dict[str, str], paths: list[str]) -> dict[str, str]:
    served: list[tuple[str, str]] = []

    async def fallback(scope: Scope, receive: Receive, send: Send) -> None:
        served.append(("fallback", scope["path"]))

    def factory(name: str) -> Any:
        return lambda _context: Named(name, served)

    edge = build_edge(
        mounts={prefix: factory(name) for prefix, name in mounts.items()},
        fallback=fallback,
        context=EdgeContext.from_settings(),
    )

    async def run() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            pass

        for path in paths:
            await edge({"type": "http", "path": path, "headers": []}, receive, send)

    asyncio.run(run())
    return {path: name for name, path in served}


def test_nested_prefixes_go_to_the_longest_whole_segment_match() -> None:
    mounts = {"/v1/events": "events", "/v1/events/batch": "batch", "/proxy/": "proxy"}
    paths = [
        "/v1/events",
        "/v1/events/x",
        "/v1/events/batch",
        "/v1/events/batch/1",
        "/v1/events/batchy",
        "/v1/eventsy",
        "/proxy",
        "/proxy/exp/predict",
        "/proxyish/x",
        "/admin/",
    ]
    assert dispatch(mounts, paths) == {
        "/v1/events": "events",
        "/v1/events/x": "events",
        "/v1/events/batch": "batch",
        "/v1/events/batch/1": "batch",
        "/v1/events/batchy": "events",
        "/proxy": "proxy",
        "/proxy/exp/predict": "proxy",
        "/proxyish/x": "fallback",
        "/admin/": "fallback",
    }  # "/v1/eventsy" reaches no part: the edge answers unknown /v1/ paths with a 404


def test_a_root_mount_takes_what_no_longer_prefix_takes() -> None:
    served = dispatch({"/": "root", "/proxy/": "proxy"}, ["/proxy/e/p", "/other", "/v1/x"])
    assert served == {"/proxy/e/p": "proxy", "/other": "root", "/v1/x": "root"}
