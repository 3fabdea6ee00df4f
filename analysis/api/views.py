"""API views: experiment results and history (scope read), webhooks and test alerts (manage)."""

from __future__ import annotations

import re

from django.conf import settings
from drf_spectacular.utils import OpenApiParameter, PolymorphicProxySerializer, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from analysis import selectors, services
from analysis.api.serializers import (
    RESULTS_PENDING,
    RESULTS_READY,
    ResultHistorySerializer,
    ResultSnapshotSerializer,
    ResultsPendingSerializer,
    TestAlertSerializer,
    WebhookSerializer,
    snapshot_data,
)
from analysis.shadow_verdicts import shadow_analyses_list
from experiments import selectors as experiment_selectors
from experiments.errors import InvalidInput
from experiments.strict import EmptyBodySerializer

MAX_HISTORY = 5000
# ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
LIMIT_PATTERN = re.compile(r"[0-9]{1,9}")


def _actor(request: Request) -> str:
    actor = getattr(request.user, "actor", None)
    if actor:
        return str(actor)
    return f"user:{request.user.get_username()}"


class ResultView(APIView):
    """The latest analysis result of an experiment, or `status: pending` before the first run.

    An experiment that exists but has not been analysed yet is not an unknown experiment
    (404 `experiment_not_found`): it answers 200 with `status` "pending", so a client polls on.
    """

    required_scope = "read"
    permission_model = "analysis.resultsnapshot"

    @extend_schema(
        responses=PolymorphicProxySerializer(
            component_name="Results",
            serializers={
                RESULTS_READY: ResultSnapshotSerializer,
                RESULTS_PENDING: ResultsPendingSerializer,
            },
            resource_type_field_name="status",
        )
    )
    def get(self, request: Request, key: str) -> Response:
        view = experiment_selectors.experiment_view_get(key=key)
        snapshot = selectors.latest_result(experiment_id=view.id)
        if snapshot is None:
            interval = float(settings.ANALYSIS_INTERVAL_S)
            pending = {
                "experiment": key,
                "status": RESULTS_PENDING,
                "experiment_status": view.status,
                "detail": "No analysis has run yet: running experiments are analysed every "
                f"{interval:g} s.",
                "analysis_interval_s": interval,
            }
            return Response(pending)
        shadows = shadow_analyses_list(experiment_id=view.id)
        return Response(snapshot_data(snapshot, experiment_key=key, shadows=shadows))


class ResultHistoryView(APIView):
    """Analysis results of an experiment, oldest first (for time series)."""

    required_scope = "read"
    permission_model = "analysis.resultsnapshot"

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY},
                description="newest N (default 500)",
            )
        ],
        responses=ResultHistorySerializer,
    )
    def get(self, request: Request, key: str) -> Response:
        view = experiment_selectors.experiment_view_get(key=key)
        raw = request.query_params.get("limit", "500")
        if not LIMIT_PATTERN.fullmatch(raw) or not 1 <= int(raw) <= MAX_HISTORY:
            raise InvalidInput({"limit": [f"Must be an integer from 1 to {MAX_HISTORY}."]})
        history = selectors.result_history(experiment_id=view.id, limit=int(raw))
        return Response(
            {
                "experiment": key,
                "results": [snapshot_data(s, experiment_key=key) for s in history],
            }
        )


class WebhookListView(APIView):
    required_scope = "manage"
    # Session users: viewers list webhooks (names and hosts only), admins add them.
    permission_model = "analysis.webhookendpoint"

    @extend_schema(responses=WebhookSerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(WebhookSerializer(selectors.webhook_list(), many=True).data)

    @extend_schema(request=WebhookSerializer, responses={201: WebhookSerializer})
    def post(self, request: Request) -> Response:
        serializer = WebhookSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        endpoint = services.webhook_create(actor=_actor(request), **serializer.validated_data)
        return Response(WebhookSerializer(endpoint).data, status=status.HTTP_201_CREATED)


class WebhookDetailView(APIView):
    required_scope = "manage"
    permission_model = "analysis.webhookendpoint"

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "webhook_id",
                {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
                OpenApiParameter.PATH,
            )
        ],
        responses={204: None},
    )
    def delete(self, request: Request, webhook_id: int) -> Response:
        services.webhook_delete(actor=_actor(request), webhook_id=webhook_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class TestAlertView(APIView):
    required_scope = "manage"
    action_permissions = {"post": "analysis.change_webhookendpoint"}

    @extend_schema(request=None, responses={202: TestAlertSerializer})
    def post(self, request: Request) -> Response:
        if request.data:
            EmptyBodySerializer(data=request.data).is_valid(raise_exception=True)
        queued = services.alert_test(actor=_actor(request))
        return Response({"queued": queued}, status=status.HTTP_202_ACCEPTED)
