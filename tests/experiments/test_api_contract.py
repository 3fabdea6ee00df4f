"""The management API's contract (issue 13): problem details, strict input, bounds, slashes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import RequestFactory
from django.utils.text import slugify
from hypothesis import given
from hypothesis import strategies as st
from rest_framework.exceptions import Throttled
from rest_framework.test import APIClient

from experiments import selectors
from experiments.api import errors as api_errors
from experiments.models import AuditEntry, Experiment, Metric
from experiments.strict import INT4_MAX, SLUG_PATTERN
from tests.factories import experiment_payload
from tests.problems import assert_problem, messages_by_field

pytestmark = pytest.mark.django_db

EXPERIMENTS = "/api/v1/experiments"


def _create(api: APIClient, **extra: Any) -> Any:
    return api.post(f"{EXPERIMENTS}/", experiment_payload(**extra), format="json")


# --- item 1: the key is immutable --------------------------------------------------------


def test_patching_an_experiment_key_is_a_400_and_changes_nothing(
    api: APIClient, metrics: Any
) -> None:
    created = _create(api)
    assert created.status_code == 201
    response = api.patch(
        f"{EXPERIMENTS}/ranker-v2/", {"key": "other", "name": "Renamed"}, format="json"
    )
    body = assert_problem(response, 400, "validation_error")
    assert body["field"] == "key" and "immutable" in body["detail"]
    experiment = Experiment.objects.get()
    assert (experiment.key, experiment.name) == ("ranker-v2", created.json()["name"])


def test_patching_a_metric_key_is_a_400_and_changes_nothing(api: APIClient, metrics: Any) -> None:
    response = api.patch("/api/v1/metrics/conversion/", {"key": "x", "name": "y"}, format="json")
    assert assert_problem(response, 400, "validation_error")["field"] == "key"
    assert Metric.objects.get(key="conversion").name == "Conversion"


# --- item 2: bounds of the columns, no NUL ------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"decision_sample_size": 2**31}, "decision_sample_size"),
        ({"cache_ttl_s": 2**31}, "cache_ttl_s"),
        ({"cache_max_entries": 2**31}, "cache_max_entries"),
        ({"cache_ttl_s": -1}, "cache_ttl_s"),
        ({"hash_version": 2**40}, "hash_version"),
        (
            {"ramp_steps": [{"canary_share": 0.5, "min_duration_s": 2**31}]},
            "ramp_steps[0].min_duration_s",
        ),
        (
            {"ramp_steps": [{"canary_share": 1.0, "min_exposures_per_arm": 2**63}]},
            "ramp_steps[0].min_exposures_per_arm",
        ),
        ({"overrides": {"qa\x00user": "v2"}}, "overrides.qa\x00user"),
        ({"overrides": {"qa-user": "v\x002"}}, "overrides.qa-user"),
        ({"name": "Ranker\x00"}, "name"),
        ({"seed": "s\x00"}, "seed"),
        (
            {"variants": [{"key": "v1", "upstream_url": "http://a\x00", "weight": 1.0}]},
            "variants[0].upstream_url",
        ),
    ],
)
def test_out_of_range_integers_and_nul_are_400_on_every_database(
    api: APIClient, metrics: Any, change: dict[str, Any], field: str
) -> None:
    created = _create(api, **change)
    assert field in messages_by_field(assert_problem(created, 400, "validation_error"))
    assert not Experiment.objects.exists()
    assert _create(api).status_code == 201
    patched = api.patch(f"{EXPERIMENTS}/ranker-v2/", change, format="json")
    assert field in messages_by_field(assert_problem(patched, 400, "validation_error"))


def test_the_largest_values_the_columns_hold_are_stored(api: APIClient, metrics: Any) -> None:
    response = _create(
        api,
        decision_sample_size=INT4_MAX,
        cache_ttl_s=INT4_MAX,
        cache_max_entries=INT4_MAX,
        ramp_steps=[
            {"canary_share": 0.5, "min_duration_s": INT4_MAX, "min_exposures_per_arm": INT4_MAX},
            {"canary_share": 1.0},
        ],
    )
    assert response.status_code == 201, response.json()
    experiment = Experiment.objects.get()
    assert experiment.decision_sample_size == experiment.cache_ttl_s == INT4_MAX
    assert experiment.ramp_steps.first().min_duration_s == INT4_MAX  # type: ignore[union-attr]


# --- item 3: the trailing slash is optional everywhere ------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("get", "experiments", None, 200),
        ("get", "experiments/ranker-v2", None, 200),
        ("patch", "experiments/ranker-v2", {"name": "Renamed"}, 200),
        ("post", "experiments/ranker-v2/start", None, 200),
        ("post", "experiments/ranker-v2/pause", {"reason": "look"}, 200),
        ("get", "experiments/ranker-v2/audit", None, 200),
        ("get", "experiments/ranker-v2/results", None, 200),
        ("get", "experiments/ranker-v2/results/history", None, 200),
        ("get", "metrics", None, 200),
        ("get", "metrics/conversion", None, 200),
        ("get", "api-keys", None, 200),
        ("get", "webhooks", None, 200),
        ("delete", "experiments/missing", None, 404),
    ],
)
@pytest.mark.parametrize("slash", ["", "/"])
def test_every_route_answers_with_and_without_the_trailing_slash(
    api: APIClient,
    metrics: Any,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
    slash: str,
) -> None:
    assert _create(api).status_code == 201
    assert api.post(f"{EXPERIMENTS}/ranker-v2/start/").status_code == 200
    response = getattr(api, method)(f"/api/v1/{path}{slash}", body, format="json")
    assert response.status_code == status, (response.status_code, response.content[:300])


def test_a_lifecycle_action_without_the_slash_starts_the_experiment(
    api: APIClient, metrics: Any
) -> None:
    _create(api)
    response = api.post(f"{EXPERIMENTS}/ranker-v2/start")
    assert response.status_code == 200 and response.json()["experiment"]["status"] == "running"


# --- item 5: unknown fields are named -----------------------------------------------------


def test_an_unknown_field_on_create_is_named_and_nothing_is_written(
    api: APIClient, metrics: Any
) -> None:
    body = assert_problem(_create(api, coverag=0.5), 400, "unknown_field")
    assert body["field"] == "coverag" and body["errors"][0]["code"] == "unknown_field"
    assert "coverag" in body["detail"]
    assert not Experiment.objects.exists()
    assert not AuditEntry.objects.filter(action="create").exists()


def test_unknown_fields_in_nested_objects_are_named_with_their_path(
    api: APIClient, metrics: Any
) -> None:
    payload = experiment_payload()
    payload["variants"][1]["colour"] = "blue"
    payload["ramp_steps"] = [{"canary_share": 0.5, "min_users": 3}, {"canary_share": 1.0}]
    payload["namespace"] = {"id": "ns", "start": 0, "end": 0.5, "size": 1}
    response = api.post(f"{EXPERIMENTS}/", payload, format="json")
    errors = messages_by_field(assert_problem(response, 400, "unknown_field"))
    assert set(errors) == {"variants[1].colour", "ramp_steps[0].min_users", "namespace.size"}


def test_unknown_fields_mixed_with_invalid_ones_are_all_listed(
    api: APIClient, metrics: Any
) -> None:
    response = _create(api, coverag=0.5, coverage=3)
    body = assert_problem(response, 400, "validation_error")
    assert {e["field"]: e["code"] for e in body["errors"]} == {
        "coverage": "max_value",
        "coverag": "unknown_field",
    }


@pytest.mark.parametrize(
    ("method", "path", "body", "code"),
    [
        ("patch", "experiments/ranker-v2/", {"colour": "blue"}, "unknown_field"),
        ("post", "experiments/ranker-v2/start/", {"force": True}, "unknown_field"),
        (
            "post",
            "experiments/ranker-v2/rollback/",
            {"reason": "x", "force": True},
            "unknown_field",
        ),
        (
            "post",
            "metrics/",
            {"key": "m", "name": "m", "kind": "mean", "direction": "lower", "unit": "ms"},
            "unknown_field",
        ),
        (
            "patch",
            "metrics/conversion/",
            {"created_at": "2020-01-01T00:00:00Z"},
            "validation_error",
        ),
        (
            "post",
            "api-keys/",
            {"name": "ci", "scopes": ["read"], "expires": "never"},
            "unknown_field",
        ),
        (
            "post",
            "webhooks/",
            {"name": "w", "url": "https://h.example.com", "secret": "s" * 16, "x": 1},
            "unknown_field",
        ),
        ("post", "webhooks/test/", {"x": 1}, "unknown_field"),
    ],
)
def test_unknown_fields_are_refused_on_every_write(
    api: APIClient, metrics: Any, method: str, path: str, body: dict[str, Any], code: str
) -> None:
    _create(api)
    before = AuditEntry.objects.count()
    response = getattr(api, method)(f"/api/v1/{path}", body, format="json")
    problem = assert_problem(response, 400, code)
    assert problem["field"] in set(body), problem
    assert AuditEntry.objects.count() == before


def test_weights_are_refused_on_create(api: APIClient, metrics: Any) -> None:
    response = _create(api, weights={"v1": 0.5, "v2": 0.5})
    assert assert_problem(response, 400, "validation_error")["field"] == "weights"


# --- item 14: every error is a problem ----------------------------------------------------


def test_malformed_json_unsupported_media_and_wrong_method_are_problems(api: APIClient) -> None:
    broken = api.post(f"{EXPERIMENTS}/", b'{"key": ', content_type="application/json")
    assert "JSON" in assert_problem(broken, 400, "malformed_json")["detail"]
    text = api.post(f"{EXPERIMENTS}/", b"key=x", content_type="text/plain")
    assert_problem(text, 415, "unsupported_media_type")
    wrong = api.put(f"{EXPERIMENTS}/x/", {}, format="json")
    assert_problem(wrong, 405, "method_not_allowed")
    assert "PATCH" in wrong["Allow"]


@pytest.mark.parametrize("debug", [False, True])
def test_unknown_api_paths_are_problem_404s_for_every_method(
    api: APIClient, settings: Any, debug: bool
) -> None:
    settings.DEBUG = debug
    for method in ("get", "post", "delete"):
        assert_problem(getattr(api, method)("/api/v1/nothing-here/"), 404, "not_found")
    assert_problem(api.get("/api/v2/experiments/"), 404, "not_found")


def test_unhandled_exceptions_are_a_500_problem_without_a_traceback(
    api: APIClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(**kwargs: Any) -> Any:
        raise RuntimeError("secret internal state")

    monkeypatch.setattr(selectors, "metric_list", explode)
    response = api.get("/api/v1/metrics/")
    body = assert_problem(response, 500, "server_error")
    assert "secret internal state" not in response.content.decode()
    assert body["detail"] == "An unexpected error occurred."
    assert any("secret internal state" in str(r.exc_info) for r in caplog.records if r.exc_info)


def test_django_error_handlers_answer_problems_under_api_only() -> None:
    factory = RequestFactory()
    api_request = factory.get("/api/v1/anything")
    page_request = factory.get("/somewhere")
    for handler, status, code in (
        (lambda r: api_errors.bad_request(r, Exception()), 400, "bad_request"),
        (lambda r: api_errors.permission_denied(r, Exception()), 403, "permission_denied"),
        (lambda r: api_errors.page_not_found(r, Exception()), 404, "not_found"),
        (api_errors.server_error, 500, "server_error"),
    ):
        response = handler(api_request)
        response.json = lambda response=response: json.loads(response.content)
        assert_problem(response, status, code)
        html = handler(page_request)
        assert html.status_code == status
        assert html["Content-Type"].startswith("text/html")


# --- item 15: the schema tells the truth --------------------------------------------------


def _schema(api: APIClient) -> dict[str, Any]:
    response = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return dict(response.json())


def test_schema_documents_pagination_errors_strict_bodies_and_bounds(api: APIClient) -> None:
    schema = _schema(api)
    paths, components = schema["paths"], schema["components"]["schemas"]
    for path in ("/api/v1/experiments/", "/api/v1/metrics/", "/api/v1/api-keys/"):
        listing = paths[path]["get"]
        ref = listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert {"count", "next", "previous", "results"} <= set(
            components[ref.split("/")[-1]]["properties"]
        )
        assert "page" in {p["name"] for p in listing["parameters"]}
    assert "404" not in paths["/api/v1/webhooks/"]["get"]["responses"]  # not paginated
    audit = paths["/api/v1/experiments/{key}/audit/"]["get"]["responses"]["200"]
    assert audit["content"]["application/json"]["schema"]["$ref"].endswith(
        "PaginatedAuditEntryList"
    )

    problem_ref = {"$ref": "#/components/schemas/Problem"}
    patch = paths["/api/v1/experiments/{key}/"]["patch"]["responses"]
    for status in ("400", "401", "403", "404", "409"):
        assert patch[status]["content"]["application/problem+json"]["schema"] == problem_ref
    assert {"type", "title", "status", "detail", "code", "field", "errors"} <= set(
        components["Problem"]["properties"]
    )

    for name in (
        "ExperimentWriteRequest",
        "PatchedExperimentWriteRequest",
        "VariantRequest",
        "RampStepRequest",
        "MetricRequest",
        "ApiKeyCreateRequest",
        "WebhookRequest",
    ):
        assert components[name]["additionalProperties"] is False, name
    write = components["ExperimentWriteRequest"]["properties"]
    no_nul = r"^[^\x00]*$"
    assert write["name"]["pattern"] == write["overrides"]["additionalProperties"]["pattern"]
    assert write["name"]["pattern"] == no_nul and re.fullmatch(no_nul, "a\x00b") is None
    assert write["cache_ttl_s"]["maximum"] == INT4_MAX
    assert components["RampStepRequest"]["properties"]["min_duration_s"]["maximum"] == INT4_MAX
    results = paths["/api/v1/experiments/{key}/results/"]["get"]["responses"]["200"]
    assert results["content"]["application/json"]["schema"]["$ref"].endswith("/Results")
    assert set(components["Results"]["discriminator"]["mapping"]) == {"ready", "pending"}


def test_schema_keeps_the_default_postprocessing_hook(settings: Any) -> None:
    hooks = settings.SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]
    assert hooks[0] == "drf_spectacular.hooks.postprocess_schema_enums"


def test_nested_objects_in_a_patch_are_validated_whole(api: APIClient, metrics: Any) -> None:
    _create(api)
    url = f"{EXPERIMENTS}/ranker-v2/"
    steps = api.patch(url, {"ramp_steps": [{"min_duration_s": 5}]}, format="json")
    assert "ramp_steps[0].canary_share" in messages_by_field(
        assert_problem(steps, 400, "validation_error")
    )
    namespace = api.patch(url, {"namespace": {"id": "ns"}}, format="json")
    assert {"namespace.start", "namespace.end"} <= set(
        messages_by_field(assert_problem(namespace, 400, "validation_error"))
    )
    uses = api.patch(url, {"metrics": [{"metric": "conversion", "role": "primary"}]}, format="json")
    assert uses.status_code == 200, uses.content  # the default margin applies
    assert uses.json()["metrics"] == [{"metric": "conversion", "role": "primary", "margin": 0.0}]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": 5}, "name"),
        ({"fallback_to_control": 0}, "fallback_to_control"),
        ({"cache_ttl_s": "12"}, "cache_ttl_s"),
        ({"coverage": True}, "coverage"),
        ({"weights": {"v1": "0.5", "v2": 0.5}}, "weights.v1"),
        ({"overrides": {"qa-user": 2}}, "overrides.qa-user"),
    ],
)
def test_values_of_the_wrong_json_type_are_refused(
    api: APIClient, metrics: Any, change: dict[str, Any], field: str
) -> None:
    _create(api)
    response = api.patch(f"{EXPERIMENTS}/ranker-v2/", change, format="json")
    body = assert_problem(response, 400, "validation_error")
    assert body["field"] == field and body["errors"][0]["code"] == "invalid_type", body


def test_deleting_a_metric_in_use_is_a_409(api: APIClient, metrics: Any) -> None:
    _create(api)
    response = api.delete("/api/v1/metrics/conversion/")
    assert "in use" in assert_problem(response, 409, "in_use")["title"]
    assert Metric.objects.filter(key="conversion").exists()


@pytest.mark.parametrize("page", ["", "abc", "0", "-1", "²"])
def test_a_page_that_is_not_a_positive_integer_is_a_400(api: APIClient, page: str) -> None:
    response = api.get(f"/api/v1/metrics/?page={page}")
    assert assert_problem(response, 400, "validation_error")["field"] == "page"
    assert_problem(api.get("/api/v1/metrics/?page=9"), 404, "not_found")


def test_an_unservable_accept_header_is_a_406_problem(api: APIClient) -> None:
    assert_problem(api.get("/api/v1/metrics/", HTTP_ACCEPT="text/csv"), 406, "not_acceptable")


def test_schema_links_each_create_to_the_operations_on_what_it_made(api: APIClient) -> None:
    paths = _schema(api)["paths"]
    links = paths["/api/v1/experiments/"]["post"]["responses"]["201"]["links"]
    start = paths["/api/v1/experiments/{key}/start/"]["post"]["operationId"]
    assert links[start]["parameters"] == {"key": "$response.body#/key"}
    webhook_links = paths["/api/v1/webhooks/"]["post"]["responses"]["201"]["links"]
    assert [link["parameters"] for link in webhook_links.values()] == [
        {"webhook_id": "$response.body#/id"}
    ]


def test_the_documented_create_example_is_accepted(api: APIClient) -> None:
    create = _schema(api)["paths"]["/api/v1/experiments/"]["post"]["requestBody"]
    (example,) = create["content"]["application/json"]["examples"].values()
    response = api.post(f"{EXPERIMENTS}/", example["value"], format="json")
    assert response.status_code == 201, response.content


def test_throttling_is_a_429_problem_with_retry_after() -> None:
    response = api_errors.exception_handler(Throttled(wait=3), {})
    response.json = lambda: json.loads(response.content)  # type: ignore[attr-defined]
    body = assert_problem(response, 429, "throttled")
    assert response["Retry-After"] == "3" and body["retry_after_s"] == 3


def test_a_body_over_the_upload_limit_is_a_413_problem(api: APIClient, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = api.post("/api/v1/metrics/", {"key": "m", "name": "x" * 2000}, format="json")
    assert_problem(response, 413, "payload_too_large")
    assert not Metric.objects.filter(key="m").exists()


def test_schema_and_docs_answer_without_the_trailing_slash(api: APIClient) -> None:
    assert api.get("/api/schema").status_code == 200
    assert api.get("/api/docs").status_code == 200


def test_a_body_that_is_not_utf8_is_an_invalid_encoding_problem(api: APIClient) -> None:
    body = b'{"key": "m\xff", "name": "x"}'
    response = api.post("/api/v1/metrics/", body, content_type="application/json")
    assert_problem(response, 400, "invalid_encoding")


@pytest.mark.parametrize(
    "url", ["http://[", "http://[::1", "http://x:abc", "http://x:70000", "http://:80"]
)
def test_unparseable_upstream_urls_are_a_400(api: APIClient, metrics: Any, url: str) -> None:
    variants = [
        {"key": "v1", "upstream_url": url, "weight": 0.5, "is_control": True},
        {"key": "v2", "upstream_url": "http://127.0.0.1:9002", "weight": 0.5},
    ]
    response = _create(api, variants=variants)
    assert assert_problem(response, 400, "validation_error")["field"] == "variants[0].upstream_url"
    slack = _create(api, slack_webhook_url=url)
    assert assert_problem(slack, 400, "validation_error")["field"] == "slack_webhook_url"


@given(st.text(alphabet="az09-_AZ é.", max_size=12))
def test_the_schema_key_pattern_is_exactly_the_services_slug_rule(key: str) -> None:
    assert bool(re.fullmatch(SLUG_PATTERN, key)) == (key != "" and slugify(key) == key)


def test_keys_are_documented_with_their_pattern(api: APIClient) -> None:
    components = _schema(api)["components"]["schemas"]
    for name, field in (
        ("ExperimentWriteRequest", "key"),
        ("VariantRequest", "key"),
        ("MetricRequest", "key"),
        ("CompleteRequest", "winner"),
    ):
        assert components[name]["properties"][field]["pattern"] == SLUG_PATTERN, name
