"""Assertions on RFC 9457 problem responses (docs/errors.md), shared by the API tests."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

PROBLEM_KEYS = {"type", "title", "status", "detail", "code", "field", "errors"}


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is a problem of this status and code, in the documented shape."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"] == "application/problem+json", response["Content-Type"]
    body: dict[str, Any] = response.json()
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["type"] == f"urn:rampart:problem:{code}"
    assert body["title"] and body["detail"]
    assert body["errors"], body
    assert body["field"] == body["errors"][0]["field"]
    for error in body["errors"]:
        assert set(error) == {"field", "code", "message"}, error
    assert "Traceback" not in response.content.decode()
    return body


def messages_by_field(body: dict[str, Any]) -> dict[str | None, list[str]]:
    """`errors` grouped by field, to assert which fields a 400 names."""
    grouped: dict[str | None, list[str]] = defaultdict(list)
    for error in body["errors"]:
        grouped[error["field"]].append(error["message"])
    return dict(grouped)
