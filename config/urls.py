"""URL configuration of the Django side: admin, management API, schema, UI."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from experiments.api.docs import SwaggerView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("analysis.api.urls")),
    path("api/v1/", include("experiments.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("routing.health")),
    path("", include("experiments.urls")),
    path("", include("analysis.urls")),
]
