"""API views: parse input, call a service or selector, render the result."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from experiments import roles, selectors, services
from experiments.api.auth import ApiKeyPrincipal, actor_of
from experiments.api.serializers import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeyRevokeSerializer,
    ApiKeySerializer,
    AuditEntrySerializer,
    CompleteSerializer,
    ExperimentSerializer,
    ExperimentWriteSerializer,
    MetricSerializer,
    ReasonSerializer,
    RollbackSerializer,
    ShadowCanarySerializer,
    TransitionSerializer,
)
from experiments.errors import InvalidInput, LockoutRisk
from experiments.models import ApiScope, ExperimentStatus
from experiments.strict import EmptyBodySerializer, StrictPageNumberPagination

CANARY_EXAMPLE = OpenApiExample(
    "A canary of two model versions",
    request_only=True,
    value={
        "key": "ranker-v2",
        "name": "Ranker v2 canary",
        "kind": "canary",
        "variants": [
            {
                "key": "v1",
                "upstream_url": "http://10.0.0.7:9001",
                "weight": 0.5,
                "is_control": True,
            },
            {"key": "v2", "upstream_url": "http://10.0.0.7:9002", "weight": 0.5},
        ],
        "ramp_steps": [{"canary_share": 0.05, "min_duration_s": 600}, {"canary_share": 1.0}],
    },
)
LIFECYCLE_ACTIONS = ("start", "pause", "resume", "advance", "complete", "rollback")
KEY_IS_IMMUTABLE = {"key": ["The key is immutable: create a new one instead."]}


def _refuse_body(request: Request) -> None:
    """Actions without input refuse any field sent anyway, naming it."""
    if request.data:
        EmptyBodySerializer(data=request.data).is_valid(raise_exception=True)


def _transition_response(result: services.TransitionResult) -> Response:
    experiment = selectors.experiment_get(key=result.experiment.key)
    body = {"changed": result.changed, "experiment": ExperimentSerializer(experiment).data}
    return Response(body)


class ExperimentViewSet(viewsets.ViewSet):
    lookup_field = "key"
    pagination_class = StrictPageNumberPagination
    lookup_value_regex = "[-a-zA-Z0-9_]+"
    serializer_class = ExperimentSerializer
    permission_model = "experiments.experiment"
    action_permissions = {
        **dict.fromkeys(LIFECYCLE_ACTIONS, roles.RUN_EXPERIMENTS),
        "audit": roles.READ,
        # Creates an experiment: the same permission as creating one.
        "shadow_canary": roles.CREATE_EXPERIMENTS,
    }
    # Actions that answer 409 when the experiment's state does not allow them (schema).
    conflict_actions = (
        "partial_update",
        "destroy",
        "start",
        "pause",
        "resume",
        "advance",
        "complete",
        "rollback",
    )

    @extend_schema(
        parameters=[OpenApiParameter("status", enum=ExperimentStatus.values)],
        responses=ExperimentSerializer(many=True),
    )
    def list(self, request: Request) -> Response:
        status_filter = request.query_params.get("status")
        if status_filter is not None and status_filter not in ExperimentStatus.values:
            raise InvalidInput(
                {"status": [f"Must be one of {', '.join(ExperimentStatus.values)}."]}
            )
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(
            selectors.experiment_list(status=status_filter), request, view=self
        )
        return paginator.get_paginated_response(ExperimentSerializer(page, many=True).data)

    @extend_schema(
        request=ExperimentWriteSerializer,
        responses={201: ExperimentSerializer},
        examples=[CANARY_EXAMPLE],
    )
    def create(self, request: Request) -> Response:
        serializer = ExperimentWriteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        kwargs = serializer.service_kwargs()
        if "weights" in kwargs:
            raise InvalidInput({"weights": ["Set each variant's weight in variants on create."]})
        experiment = services.experiment_create(actor=actor_of(request), **kwargs)
        return Response(
            ExperimentSerializer(selectors.experiment_get(key=experiment.key)).data,
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(responses=ExperimentSerializer)
    def retrieve(self, request: Request, key: str) -> Response:
        return Response(ExperimentSerializer(selectors.experiment_get(key=key)).data)

    @extend_schema(request=ExperimentWriteSerializer(partial=True), responses=ExperimentSerializer)
    def partial_update(self, request: Request, key: str) -> Response:
        serializer = ExperimentWriteSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        changes = serializer.service_kwargs()
        if "key" in changes:
            raise InvalidInput(KEY_IS_IMMUTABLE)
        services.experiment_update(actor=actor_of(request), key=key, **changes)
        return Response(ExperimentSerializer(selectors.experiment_get(key=key)).data)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, key: str) -> Response:
        services.experiment_delete(actor=actor_of(request), key=key)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses=TransitionSerializer)
    @action(detail=True, methods=["post"])
    def start(self, request: Request, key: str) -> Response:
        _refuse_body(request)
        return _transition_response(services.experiment_start(actor=actor_of(request), key=key))

    @extend_schema(request=ReasonSerializer, responses=TransitionSerializer)
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, key: str) -> Response:
        body = ReasonSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return _transition_response(
            services.experiment_pause(
                actor=actor_of(request), key=key, reason=body.validated_data["reason"]
            )
        )

    @extend_schema(request=None, responses=TransitionSerializer)
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, key: str) -> Response:
        _refuse_body(request)
        return _transition_response(services.experiment_resume(actor=actor_of(request), key=key))

    @extend_schema(request=CompleteSerializer, responses=TransitionSerializer)
    @action(detail=True, methods=["post"])
    def complete(self, request: Request, key: str) -> Response:
        body = CompleteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return _transition_response(
            services.experiment_complete(
                actor=actor_of(request),
                key=key,
                winner_key=body.validated_data["winner"],
                reason=body.validated_data["reason"],
            )
        )

    @extend_schema(request=RollbackSerializer, responses=TransitionSerializer)
    @action(detail=True, methods=["post"])
    def rollback(self, request: Request, key: str) -> Response:
        body = RollbackSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return _transition_response(
            services.experiment_rollback(
                actor=actor_of(request), key=key, reason=body.validated_data["reason"]
            )
        )

    @extend_schema(request=ReasonSerializer, responses=TransitionSerializer)
    @action(detail=True, methods=["post"])
    def advance(self, request: Request, key: str) -> Response:
        body = ReasonSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return _transition_response(
            services.experiment_advance_ramp(
                actor=actor_of(request), key=key, reason=body.validated_data["reason"]
            )
        )

    @extend_schema(
        request=None,
        parameters=[
            OpenApiParameter(
                "shadow",
                {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
                OpenApiParameter.PATH,
                description="the key of one of the experiment's shadow variants",
            )
        ],
        responses={200: ShadowCanarySerializer, 201: ShadowCanarySerializer},
    )
    @action(
        detail=True,
        methods=["post"],
        url_path=r"shadows/(?P<shadow>[-a-zA-Z0-9_]+)/canary",
        url_name="shadow-canary",
    )
    def shadow_canary(self, request: Request, key: str, shadow: str) -> Response:
        """Create a draft canary of control and this shadow (once; 200 with it afterwards)."""
        _refuse_body(request)
        result = services.canary_from_shadow(actor=actor_of(request), key=key, shadow_key=shadow)
        experiment = selectors.experiment_get(key=result.experiment.key)
        body = {"created": result.created, "experiment": ExperimentSerializer(experiment).data}
        return Response(body, status=status.HTTP_201_CREATED if result.created else 200)

    @extend_schema(responses=AuditEntrySerializer(many=True))
    @action(detail=True, methods=["get"])
    def audit(self, request: Request, key: str) -> Response:
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(
            selectors.audit_for_experiment(key=key), request, view=self
        )
        return paginator.get_paginated_response(AuditEntrySerializer(page, many=True).data)


class MetricViewSet(viewsets.ViewSet):
    lookup_field = "key"
    pagination_class = StrictPageNumberPagination
    conflict_actions = ("destroy",)  # a metric an experiment uses cannot be deleted
    lookup_value_regex = "[-a-zA-Z0-9_]+"
    serializer_class = MetricSerializer
    permission_model = "experiments.metric"

    @extend_schema(responses=MetricSerializer(many=True))
    def list(self, request: Request) -> Response:
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(selectors.metric_list(), request, view=self)
        return paginator.get_paginated_response(MetricSerializer(page, many=True).data)

    @extend_schema(request=MetricSerializer, responses={201: MetricSerializer})
    def create(self, request: Request) -> Response:
        serializer = MetricSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data: dict[str, Any] = dict(serializer.validated_data)
        metric = services.metric_create(actor=actor_of(request), **data)
        return Response(MetricSerializer(metric).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses=MetricSerializer)
    def retrieve(self, request: Request, key: str) -> Response:
        return Response(MetricSerializer(selectors.metric_get(key=key)).data)

    @extend_schema(request=MetricSerializer(partial=True), responses=MetricSerializer)
    def partial_update(self, request: Request, key: str) -> Response:
        serializer = MetricSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        if "key" in serializer.validated_data:
            raise InvalidInput(KEY_IS_IMMUTABLE)
        metric = services.metric_update(
            actor=actor_of(request), key=key, **serializer.validated_data
        )
        return Response(MetricSerializer(metric).data)

    @extend_schema(responses={204: None})
    def destroy(self, request: Request, key: str) -> Response:
        services.metric_delete(actor=actor_of(request), key=key)
        return Response(status=status.HTTP_204_NO_CONTENT)


class KeyRevocationNeedsConfirmation(exceptions.APIException):
    """409: the revocation could lock its holders out; repeat with `{"confirm": true}`."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "confirmation_required"


class ApiKeyViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    lookup_field = "prefix"
    lookup_value_regex = "[a-zA-Z0-9_-]+"
    serializer_class = ApiKeySerializer
    permission_model = "experiments.apikey"
    action_permissions = {"revoke": roles.REVOKE_KEYS}

    def get_queryset(self) -> Any:
        return selectors.api_key_list()

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer})
    def create(self, request: Request) -> Response:
        body = ApiKeyCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        if ApiScope.MANAGE in body.validated_data["scopes"] and not _may_grant_manage(request):
            raise exceptions.PermissionDenied("Only admins can create keys with the manage scope.")
        key, secret = services.api_key_create(actor=actor_of(request), **body.validated_data)
        data = {**ApiKeySerializer(key).data, "key": secret}
        return Response(data, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=ApiKeyRevokeSerializer,
        responses=ApiKeySerializer,
        description="Revoking the key that makes the request, or the last active key with "
        'the manage scope, answers 409 `confirmation_required` unless the body is `{"confirm": '
        "true}`; a confirmed one answers 200 with a `warning` member.",
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, prefix: str) -> Response:
        body = ApiKeyRevokeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        caller: Any = request.user
        try:
            revocation = services.api_key_revoke(
                actor=actor_of(request),
                prefix=prefix,
                requested_by=caller.prefix if isinstance(caller, ApiKeyPrincipal) else "",
                confirmed=body.validated_data["confirm"],
            )
        except LockoutRisk as exc:
            raise KeyRevocationNeedsConfirmation(
                " ".join(exc.warnings) + ' Repeat with {"confirm": true} to revoke it anyway.'
            ) from exc
        data = dict(ApiKeySerializer(revocation.key).data)
        if revocation.warnings:
            data["warning"] = " ".join(revocation.warnings)
        return Response(data)


def _may_grant_manage(request: Request) -> bool:
    """Keys with the manage scope act as admins, so only admins (and manage keys) mint them."""
    caller: Any = request.user
    if isinstance(caller, ApiKeyPrincipal):
        return caller.role == roles.ADMIN
    return bool(caller.has_perm(roles.GRANT_MANAGE_SCOPE))
