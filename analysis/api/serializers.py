"""Serializers of the analysis API; webhook URLs and secrets are write-only."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from rest_framework import serializers

from analysis.models import ResultSnapshot, WebhookEndpoint
from experiments.strict import StrictSerializer

RESULTS_READY = "ready"
RESULTS_PENDING = "pending"


class ResultSnapshotSerializer(serializers.Serializer[ResultSnapshot]):
    """One analysis run (the shape `analysis.guardrails` documents and the UI renders)."""

    experiment = serializers.SerializerMethodField()
    status = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    decision = serializers.CharField()
    reason = serializers.CharField()
    health = serializers.JSONField()
    exposures = serializers.JSONField()
    metrics = serializers.JSONField()
    latency = serializers.JSONField()
    shadows = serializers.SerializerMethodField(
        help_text="Per shadow variant: its verdict (collecting | ready | worse), the reason, and "
        "the latest paired intervals (`analysis.shadow_verdicts`). Only the latest result "
        "carries them; history entries have an empty list."
    )

    def get_shadows(self, snapshot: ResultSnapshot) -> list[dict[str, Any]]:
        return list(self.context.get("shadows", []))

    def get_experiment(self, snapshot: ResultSnapshot) -> str:
        return str(self.context.get("experiment_key", ""))

    def get_status(self, snapshot: ResultSnapshot) -> Literal["ready"]:
        return "ready"


class ResultsPendingSerializer(serializers.Serializer[Any]):
    """What `.../results` answers (200) before the experiment's first analysis run."""

    experiment = serializers.CharField()
    status = serializers.ChoiceField(choices=[RESULTS_PENDING])
    experiment_status = serializers.CharField(help_text="draft, running, paused, ...")
    detail = serializers.CharField()
    analysis_interval_s = serializers.FloatField(
        help_text="Running experiments are analysed this often; results appear after one run."
    )


class ResultHistorySerializer(serializers.Serializer[Any]):
    experiment = serializers.CharField()
    results = ResultSnapshotSerializer(many=True)


def snapshot_data(
    snapshot: ResultSnapshot,
    *,
    experiment_key: str,
    shadows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    context = {"experiment_key": experiment_key, "shadows": shadows or []}
    return dict(ResultSnapshotSerializer(snapshot, context=context).data)


class WebhookSerializer(StrictSerializer):
    """Read: id, name, host, enabled. Write: name, url, secret, enabled."""

    id = serializers.IntegerField(read_only=True)
    name = serializers.CharField(max_length=200)
    url = serializers.URLField(max_length=500, write_only=True)
    secret = serializers.CharField(max_length=200, write_only=True, min_length=16)
    enabled = serializers.BooleanField(default=True)
    host = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField(read_only=True)

    def get_host(self, endpoint: WebhookEndpoint) -> str:
        """Only the host, so an operator can tell endpoints apart without seeing the URL."""
        return urlsplit(endpoint.url).hostname or ""


class TestAlertSerializer(serializers.Serializer[Any]):
    queued = serializers.IntegerField()
