"""URL configuration of the Django side: admin, management API, schema, UI."""

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView

from experiments.api.docs import SwaggerView
from experiments.api.errors import api_not_found

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("analysis.api.urls")),
    path("api/v1/", include("experiments.api.urls")),
    re_path(r"^api/schema/?$", SpectacularAPIView.as_view(), name="schema"),
    re_path(r"^api/docs/?$", SwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    # Anything else under /api/ is a problem+json 404 for every method, in debug mode too.
    re_path(r"^api/", api_not_found),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("routing.edge.health")),
    path("", include("experiments.urls")),
    path("", include("analysis.urls")),
]

# Django's own error pages answer problem+json under /api/ and HTML elsewhere.
handler400 = "experiments.api.errors.bad_request"
handler403 = "experiments.api.errors.permission_denied"
handler404 = "experiments.api.errors.page_not_found"
handler500 = "experiments.api.errors.server_error"
