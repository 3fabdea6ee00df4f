"""The Celery application; `celery -A config worker` and `celery -A config beat` load it."""

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.dev")

app = Celery("rampart")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


class _MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics: the worker's Prometheus exposition (all pool processes in multiprocess
    mode), the same body the edge and the web app serve."""

    def do_GET(self) -> None:
        from routing.edge.health import METRICS_UNAUTHORIZED, metrics_authorized, metrics_exposition

        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        if not metrics_authorized(self.headers.get("Authorization")):
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("WWW-Authenticate", 'Bearer realm="metrics"')
            self.send_header("Content-Length", str(len(METRICS_UNAUTHORIZED)))
            self.end_headers()
            self.wfile.write(METRICS_UNAUTHORIZED)
            return
        body, content_type = metrics_exposition(self.headers.get("Accept"))
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the worker's log."""


@worker_ready.connect
def serve_worker_metrics(**_: Any) -> None:
    """Workers have no web server; WORKER_METRICS_PORT gives them one for /metrics only."""
    from django.conf import settings

    port = int(settings.WORKER_METRICS_PORT)
    if not port:
        return
    server = ThreadingHTTPServer((settings.WORKER_METRICS_HOST, port), _MetricsHandler)
    threading.Thread(target=server.serve_forever, name="rampart-metrics", daemon=True).start()
