"""URL routes of the analysis API, mounted at /api/v1/ before the experiments routes."""

from django.urls import path, re_path

from analysis.api.views import (
    ResultHistoryView,
    ResultView,
    TestAlertView,
    WebhookDetailView,
    WebhookListView,
)

KEY = r"(?P<key>[-a-zA-Z0-9_]+)"

urlpatterns = [
    re_path(rf"^experiments/{KEY}/results/?$", ResultView.as_view(), name="experiment-results"),
    re_path(
        rf"^experiments/{KEY}/results/history/?$",
        ResultHistoryView.as_view(),
        name="experiment-results-history",
    ),
    path("webhooks", WebhookListView.as_view(), name="webhook-list"),
    path("webhooks/", WebhookListView.as_view()),
    path("webhooks/test", TestAlertView.as_view(), name="webhook-test"),
    path("webhooks/test/", TestAlertView.as_view()),
    path("webhooks/<int:webhook_id>", WebhookDetailView.as_view(), name="webhook-detail"),
    path("webhooks/<int:webhook_id>/", WebhookDetailView.as_view()),
]
