"""URL routes of the analysis API, mounted at /api/v1/ before the experiments routes."""

from django.urls import re_path

from analysis.api.verdict import VerdictView
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
    re_path(rf"^experiments/{KEY}/verdict/?$", VerdictView.as_view(), name="experiment-verdict"),
    # One pattern per route with an optional trailing slash, like the experiments router,
    # so the OpenAPI schema lists each endpoint once.
    re_path(r"^webhooks/?$", WebhookListView.as_view(), name="webhook-list"),
    re_path(r"^webhooks/test/?$", TestAlertView.as_view(), name="webhook-test"),
    re_path(
        r"^webhooks/(?P<webhook_id>[0-9]{1,18})/?$",
        WebhookDetailView.as_view(),
        name="webhook-detail",
    ),
]
