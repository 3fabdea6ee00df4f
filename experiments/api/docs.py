"""The Swagger UI page: when the docs are private (API_DOCS_PUBLIC=false), a browser that is
not logged in is sent to the login page instead of getting a JSON 401."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.views import redirect_to_login
from drf_spectacular.views import SpectacularSwaggerView
from rest_framework import exceptions


class SwaggerView(SpectacularSwaggerView):
    def handle_exception(self, exc: Exception) -> Any:
        if isinstance(exc, exceptions.NotAuthenticated) and "Authorization" not in (
            self.request.headers
        ):
            return redirect_to_login(self.request.get_full_path())
        return super().handle_exception(exc)
