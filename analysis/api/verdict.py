"""The verdict endpoint for Argo Rollouts and Flagger: ``/api/v1/experiments/{key}/verdict``.

One URL, two callers, each answered the way it evaluates an answer (``analysis.verdict`` says
what ``pass``, ``fail`` and ``running`` mean; the body is ``verdict_document`` for both):

``GET`` — Argo Rollouts' Web metric provider (argo-rollouts docs/analysis/web.md). The
  provider sends ``headers`` from the AnalysisTemplate, so the key travels as
  ``Authorization: Bearer rk_...`` from a Secret (``args[].valueFrom.secretKeyRef``, docs/
  features/analysis.md, "Analysis Template Arguments"). Argo takes a non-2xx answer as a
  measurement *error*, not a failure, so every verdict answers 200 and the template decides
  on the JSON: ``jsonPath: "{$.verdict}"`` with ``failureCondition: result == "fail"``
  (background analysis: only ``fail`` fails a measurement) or with ``successCondition:
  result == "pass"`` as well (a step gate: ``running`` meets neither condition, the
  measurement is Inconclusive and Argo pauses the rollout; docs/features/analysis.md,
  "Inconclusive Runs"). deploy/kubernetes/ holds both.

``POST`` — Flagger webhooks (flagger docs/usage/webhooks.md). Flagger posts
  ``{"name", "namespace", "phase", "checksum", "metadata": {...}}`` and reads only the
  status code: 2xx advances (for a ``rollback`` hook: rolls back), anything else halts and
  counts a failed check, logging the body. Flagger's webhook spec has no headers (its
  ``CanaryWebhook`` holds type, name, url, timeout, metadata, retries and muteAlert), so the
  key goes in ``metadata.key`` (an ``Authorization`` header still works behind a proxy that
  adds one). ``metadata.hook`` names the hook type the webhook is registered as, because
  Flagger does not send it:
    * ``rollout``, ``pre-rollout``, ``confirm-rollout`` (the default): 200 unless ``fail``;
    * ``confirm-promotion``, ``confirm-traffic-increase``: 200 only on ``pass``;
    * ``rollback``: 200 only on ``fail`` (Flagger then stops and fails the canary).
  Any other answer is 409 with the same document, which Flagger logs as the reason.

Both need a key with the ``read`` scope (``manage`` implies it): the verdict is read-only.
An unknown experiment is 404 ``experiment_not_found``; keys 401/403 (problem details).
"""

from __future__ import annotations

from typing import Any, Final

from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from analysis import selectors
from analysis.verdict import FAIL, PASS, RUNNING, LatestResult, verdict_document
from experiments import selectors as experiment_selectors
from experiments.roles import READ
from experiments.strict import StrictCharField

HOOK_DEFAULT: Final = "rollout"
# Flagger hook type -> the verdicts that answer 200.
HOOK_PASSES: Final[dict[str, frozenset[str]]] = {
    "rollout": frozenset({PASS, RUNNING}),
    "pre-rollout": frozenset({PASS, RUNNING}),
    "confirm-rollout": frozenset({PASS, RUNNING}),
    "confirm-traffic-increase": frozenset({PASS}),
    "confirm-promotion": frozenset({PASS}),
    "rollback": frozenset({FAIL}),
}
REFUSED_STATUS: Final = 409


class VerdictSerializer(serializers.Serializer[Any]):
    """The verdict with its evidence (``analysis.verdict.verdict_document``)."""

    experiment = serializers.CharField()
    verdict = serializers.ChoiceField(choices=["pass", "fail", "running"])
    reason = serializers.CharField()
    status = serializers.CharField()
    kind = serializers.CharField()
    control = serializers.CharField()
    winner = serializers.CharField(allow_null=True)
    canary_share = serializers.FloatField(allow_null=True)
    ramp_position = serializers.IntegerField(allow_null=True)
    evidence = serializers.JSONField(allow_null=True)

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        # "pass" is a Python keyword, so the two flags cannot be declared as attributes.
        fields = super().get_fields()
        fields["pass"] = serializers.BooleanField()
        fields["fail"] = serializers.BooleanField()
        return fields


class FlaggerMetadataSerializer(serializers.Serializer[Any]):
    key = serializers.CharField(required=False, help_text="API key (read scope)")
    hook = serializers.ChoiceField(
        choices=sorted(HOOK_PASSES),
        required=False,
        help_text=f"the Flagger hook type of this webhook (default {HOOK_DEFAULT})",
    )


class FlaggerPayloadSerializer(serializers.Serializer[Any]):
    """Flagger's webhook payload. Not strict: Flagger owns it, and fields it adds must not
    break rollouts; the fields Rampart reads are validated."""

    # Strings only, as the schema says (DRF's CharField would take 7 as "7").
    name = StrictCharField(required=False, allow_blank=True)
    namespace = StrictCharField(required=False, allow_blank=True)
    phase = StrictCharField(required=False, allow_blank=True)
    checksum = StrictCharField(required=False, allow_blank=True)
    metadata = serializers.DictField(child=StrictCharField(allow_blank=True), required=False)


_TEXT: Final = {"type": "string", "pattern": r"^[^\x00]*$"}
FLAGGER_PAYLOAD_SCHEMA: Final = {
    "type": "object",
    "description": "Flagger's webhook payload (docs.flagger.app/usage/webhooks).",
    "properties": {
        "name": _TEXT,
        "namespace": _TEXT,
        "phase": _TEXT,
        "checksum": _TEXT,
        "metadata": {
            "type": "object",
            "properties": {
                "key": {**_TEXT, "description": "API key with the read scope"},
                "hook": {"enum": sorted(HOOK_PASSES), "description": "Flagger hook type"},
            },
            "additionalProperties": _TEXT,
        },
    },
    "additionalProperties": True,
}


def _metadata_key(request: Request) -> str | None:
    """The API key in a Flagger payload's ``metadata.key``, if any."""
    data = request.data
    metadata = data.get("metadata") if isinstance(data, dict) else None
    raw = metadata.get("key") if isinstance(metadata, dict) else None
    return raw if isinstance(raw, str) and raw else None


def _document(key: str) -> dict[str, Any]:
    view = experiment_selectors.experiment_view_get(key=key)
    snapshot = selectors.latest_result(experiment_id=view.id)
    latest = None
    if snapshot is not None:
        latest = LatestResult(
            created_at=snapshot.created_at,
            decision=snapshot.decision,
            reason=snapshot.reason,
            health=snapshot.health,
            exposures=snapshot.exposures,
            metrics=snapshot.metrics,
        )
    return verdict_document(view, latest, now=timezone.now())


class VerdictView(APIView):
    """``pass``, ``fail`` or ``running`` with the evidence: GET for Argo, POST for Flagger."""

    required_scope = "read"
    action_permissions = {"get": READ, "post": READ}

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # Flagger cannot send headers: a key in metadata.key is presented as the Bearer
        # header the API's own authentication reads, so a key is checked one way everywhere.
        if request.method == "POST" and "HTTP_AUTHORIZATION" not in request.META:
            key = _metadata_key(request)
            if key is not None:
                request.META["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        super().initial(request, *args, **kwargs)

    @extend_schema(
        summary="Verdict for Argo Rollouts (Web metric provider)",
        description="Always 200 for an existing experiment; decide on `$.verdict`.",
        responses=VerdictSerializer,
    )
    def get(self, request: Request, key: str) -> Response:
        return Response(_document(key))

    @extend_schema(
        summary="Verdict for Flagger webhooks",
        description="200 when the verdict lets the hook named by `metadata.hook` proceed "
        "(rollout/pre-rollout/confirm-rollout: not fail; confirm-promotion/"
        "confirm-traffic-increase: pass; rollback: fail), else 409, both with the verdict.",
        # Inline, not a component: Flagger owns this payload, and the body stays open to
        # fields a later Flagger adds (refusing one would halt every rollout).
        request={"application/json": FLAGGER_PAYLOAD_SCHEMA},
        responses={
            200: VerdictSerializer,
            409: OpenApiResponse(VerdictSerializer, description="the hook must not proceed"),
        },
    )
    def post(self, request: Request, key: str) -> Response:
        payload = FlaggerPayloadSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        metadata = FlaggerMetadataSerializer(data=payload.validated_data.get("metadata", {}))
        if not metadata.is_valid():
            raise exceptions.ValidationError({"metadata": metadata.errors})
        hook = metadata.validated_data.get("hook", HOOK_DEFAULT)
        document = _document(key)
        allowed = document["verdict"] in HOOK_PASSES[hook]
        return Response(document, status=200 if allowed else REFUSED_STATUS)
