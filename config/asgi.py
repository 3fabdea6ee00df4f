"""ASGI entry point: `uvicorn config.asgi:application` serves the edge and the Django app.

One process answers everything: the edge (``routing.edge.app``) serves ``/v1/decide``,
``/v1/decide/batch`` and ``/v1/config`` from its in-process snapshot, and dispatches these
prefixes to the parts mounted below; every other path goes to Django's ASGI app (UI, admin,
``/api/v1/``). ``RequestIdMiddleware`` gives every request a logging context with a request
id (``routing.logcontext``; an incoming ``X-Request-ID`` is kept and echoed).

    /proxy/                       routing.proxy.app.ProxyApp (inference, per-unit variant)
    /v1/events                    routing.edge.ingest.EventsApp (business events, in batches)
    /v1/labels                    routing.edge.labels.LabelsApp (true outcomes of predictions)
    /v1/exposures                 routing.edge.exposures_api.ExposuresApp (SDK-local decisions)
    /api/features/                routing.edge.features_api.FeaturesApp (GrowthBook SDK payload)
    /healthz, /readyz, /metrics   routing.edge.health (liveness, readiness, Prometheus)
    /static/                      routing.edge.health.StaticFilesApp (no Django per file)
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.dev")
django_application = get_asgi_application()

from django.conf import settings  # noqa: E402
from django.urls import get_resolver  # noqa: E402

# Import every view now. Otherwise the first request to each part of the web app imports it
# inside this process, stalling the proxy and decision traffic that shares the event loop.
get_resolver().url_patterns  # noqa: B018

# The pipeline's metrics are declared at import; importing them here lists their families on
# the edge's /metrics, with the workers' values when they share PROMETHEUS_MULTIPROC_DIR.
import analysis.metrics  # noqa: E402, F401
from routing.edge.app import build_edge  # noqa: E402
from routing.edge.exposures_api import ExposuresApp  # noqa: E402
from routing.edge.features_api import FeaturesApp  # noqa: E402
from routing.edge.health import HealthApp, MetricsApp, ReadyApp, StaticFilesApp  # noqa: E402
from routing.edge.ingest import EventsApp  # noqa: E402
from routing.edge.labels import LabelsApp  # noqa: E402
from routing.logcontext import RequestIdMiddleware  # noqa: E402
from routing.proxy.app import ProxyApp  # noqa: E402

edge = build_edge(
    mounts={
        "/proxy/": ProxyApp,
        "/v1/events": EventsApp,
        "/v1/labels": LabelsApp,
        "/v1/exposures": ExposuresApp,
        "/api/features": FeaturesApp,
        "/healthz": HealthApp,
        "/readyz": ReadyApp,
        "/metrics": MetricsApp,
        str(settings.STATIC_URL): StaticFilesApp,
    },
    fallback=django_application,
)
application = RequestIdMiddleware(edge)
