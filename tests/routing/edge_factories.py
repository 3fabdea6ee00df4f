"""Edge applications that tests serve with ``uvicorn --factory`` in a child process."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def events_edge() -> Any:
    """The edge with the events API mounted at /v1/events and no Django fallback."""
    import django

    # The edge modules import models, so they may be imported only after django.setup().
    django.setup()
    from routing.edge.app import build_edge
    from routing.edge.ingest import EventsApp

    return build_edge(mounts={"/v1/events": EventsApp})


def exposures_edge() -> Any:
    """The edge with the events API at /v1/events and the exposures API at /v1/exposures."""
    import django

    django.setup()
    from routing.edge.app import build_edge
    from routing.edge.exposures_api import ExposuresApp
    from routing.edge.ingest import EventsApp

    return build_edge(mounts={"/v1/events": EventsApp, "/v1/exposures": ExposuresApp})


@dataclass
class ServedEdge:
    """An edge served by uvicorn in a child process, on the test database."""

    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop it gracefully: the lifespan shutdown writes every buffered exposure."""
        from tests.processes import stop_process

        stop_process(self.process)


@contextlib.contextmanager
def serve_edge(
    factory: str, *, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[ServedEdge]:
    """Serve ``factory`` (a function of this module) on a free port until the block ends."""
    # Imported here: uvicorn imports this module in the child before Django is set up.
    from tests.processes import free_port, start_process, stop_process, wait_for_http

    port = free_port()
    process = start_process(
        [
            "-m",
            "uvicorn",
            "--factory",
            f"tests.routing.edge_factories:{factory}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--http",
            "routing.edge.server:EdgeHttpProtocol",
            "--lifespan",
            "on",
        ],
        env=env,
        log=log,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/v1/config", timeout=30)
        yield ServedEdge(url=url, process=process)
    finally:
        stop_process(process)


def labels_edge() -> Any:
    """The edge with the events API at /v1/events and the labels API at /v1/labels."""
    import django

    django.setup()
    from routing.edge.app import build_edge
    from routing.edge.ingest import EventsApp
    from routing.edge.labels import LabelsApp

    return build_edge(mounts={"/v1/events": EventsApp, "/v1/labels": LabelsApp})
