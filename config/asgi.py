"""ASGI entry point: `uvicorn config.asgi:application` serves the edge and the Django app.

The edge (routing.edge) answers /v1/... from its in-process snapshot; every other path
goes to Django's ASGI app.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.dev")
django_application = get_asgi_application()

from django.conf import settings  # noqa: E402

from routing.edge import build_edge  # noqa: E402

if settings.DEBUG:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    django_application = ASGIStaticFilesHandler(django_application)

application = build_edge(fallback=django_application)
