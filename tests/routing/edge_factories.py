"""Edge applications that tests serve with ``uvicorn --factory`` in a child process."""

from __future__ import annotations

from typing import Any


def events_edge() -> Any:
    """The edge with the events API mounted at /v1/events and no Django fallback."""
    import django

    # The edge modules import models, so they may be imported only after django.setup().
    django.setup()
    from routing.edge import build_edge
    from routing.ingest import EventsApp

    return build_edge(mounts={"/v1/events": EventsApp})
