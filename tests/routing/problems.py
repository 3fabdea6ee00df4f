"""Assertions on the edge's problem details (RFC 9457), shared by the edge's tests."""

from __future__ import annotations

from typing import Any

import httpx

from routing.edge.problems import TITLES


def assert_problem(
    response: httpx.Response,
    status: int,
    code: str,
    field: str | None = None,
    *,
    index: int | None = None,
) -> dict[str, Any]:
    """``response`` is a problem+json answer with this status, code, field and index."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:rampart:problem:{code}"
    assert body["title"] == TITLES[code]
    assert (body["status"], body["code"], body["field"]) == (status, code, field), body
    assert body["detail"] and isinstance(body["detail"], str)
    assert body["errors"] and body["errors"][0]["field"] == field
    assert all(set(entry) >= {"field", "code", "message"} for entry in body["errors"])
    assert body.get("index") == index, body
    if index is not None:
        assert body["errors"][0]["index"] == index
    return body
