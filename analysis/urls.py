"""URL routes of the web UI parts that show analysis results, alerts and webhooks."""

from django.urls import path

from analysis import views

app_name = "analysis"

urlpatterns = [
    path("experiments/<slug:key>/results/", views.results, name="results"),
    path("experiments/<slug:key>/results.json", views.chart_data, name="chart-data"),
    path("experiments/<slug:key>/alerts/", views.alerts, name="alerts"),
    path("analysis/decisions/", views.decisions, name="decisions"),
    path("settings/webhooks/", views.webhooks, name="webhooks"),
    path("settings/webhooks/new/", views.webhook_create, name="webhook-create"),
    path("settings/webhooks/test/", views.alert_test, name="alert-test"),
    path("settings/webhooks/<int:webhook_id>/delete/", views.webhook_delete, name="webhook-delete"),
]
