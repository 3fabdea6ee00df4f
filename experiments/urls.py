"""URL routes of the web UI for experiments, metrics and settings, mounted at the site root."""

from django.urls import path

from experiments import shadow_views, views

app_name = "experiments"

urlpatterns = [
    path("", views.experiment_list, name="list"),
    path("experiments/new/", views.experiment_create, name="create"),
    path("experiments/<slug:key>/", views.experiment_detail, name="detail"),
    path("experiments/<slug:key>/edit/", views.experiment_edit, name="edit"),
    path("experiments/<slug:key>/overview/", views.experiment_overview, name="overview"),
    path("experiments/<slug:key>/audit/", views.experiment_audit, name="audit"),
    path(
        "experiments/<slug:key>/actions/<slug:action>/",
        views.experiment_action,
        name="action",
    ),
    path(
        "experiments/<slug:key>/shadows/<slug:shadow>/canary/",
        shadow_views.shadow_canary,
        name="shadow-canary",
    ),
    # Not /metrics/: the edge serves Prometheus metrics under that prefix.
    path("catalogue/", views.metric_list, name="metric-list"),
    path("catalogue/new/", views.metric_create, name="metric-create"),
    path("catalogue/<slug:key>/edit/", views.metric_edit, name="metric-edit"),
    path("settings/", views.settings_page, name="settings"),
    path("settings/api-keys/new/", views.api_key_create, name="api-key-create"),
    path("settings/api-keys/<slug:prefix>/revoke/", views.api_key_revoke, name="api-key-revoke"),
]
