"""The SDK clients against a real edge, and their retry and buffering rules on a mock server."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from experiments import services
from rampart_sdk import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    Decision,
    Event,
    ExperimentNotFoundError,
    ExperimentNotOnEdgeError,
    InvalidEventError,
    NotFoundError,
    PermissionDeniedError,
    RampartConnectionError,
    RampartError,
    RetryPolicy,
    ServerError,
    TrackResult,
)
from rampart_sdk._transport import EventBuffer
from routing.models import Event as StoredEvent
from tests.factories import create_experiment
from tests.routing.sdk.conftest import EdgeServer

FAST_RETRY = RetryPolicy(max_retries=3, backoff_base_s=0.001, backoff_cap_s=0.002)


def _start_ab(key: str = "ranker-v2") -> None:
    create_experiment(key, "ab")
    services.experiment_start(actor="test", key=key)


# --- against the edge ---------------------------------------------------------------------


def test_decisions_from_the_edge_and_typed_errors(
    edge: EdgeServer, metrics: Any, make_key: Callable[..., str]
) -> None:
    _start_ab()
    edge.sync()
    units = [f"user-{n}" for n in range(2500)]
    with Client(edge.url, edge.key) as client:
        decision = client.decide("ranker-v2", "u-1")
        raw = httpx.get(
            f"{edge.url}/v1/decide",
            params={"experiment": "ranker-v2", "unit": "u-1"},
            headers={"Authorization": f"Bearer {edge.key}"},
        ).json()
        assert decision == Decision(**raw)
        assert decision.reason == "assigned" and decision.in_experiment
        assert client.decide("ranker-v2", 42) == client.decide("ranker-v2", "42")

        many = client.decide_many("ranker-v2", units)  # three requests of at most 1,000
        assert [d.unit for d in many] == units
        assert {d.variant for d in many} == {"v1", "v2"}
        assert many[1234] == client.decide("ranker-v2", units[1234])
        assert client.decide_many("ranker-v2", []) == []
        assert client.decide_all("u-1") == {"ranker-v2": decision}
        assert client.decide_all("u-1", ["ranker-v2"]) == {"ranker-v2": decision}

        with pytest.raises(ExperimentNotFoundError) as missing:
            client.decide("no-such-experiment", "u-1")
        assert (missing.value.status, missing.value.code, missing.value.field) == (
            404,
            "experiment_not_found",
            "experiment",
        )
        assert isinstance(missing.value, NotFoundError)
        with pytest.raises(BadRequestError) as bad_unit:
            client.decide("ranker-v2", "x" * 201)
        assert bad_unit.value.field == "unit" and bad_unit.value.payload["detail"]
        assert bad_unit.value.code == "validation_error"
        assert bad_unit.value.errors[0]["field"] == "unit"
        with pytest.raises(BadRequestError) as bad_batch:
            client.decide_many("ranker-v2", ["u-1", "", "u-3"])
        assert (bad_batch.value.index, bad_batch.value.field) == (1, "units[1]")
        # Created after the edge's last snapshot refresh: served, not "not found".
        _start_ab("fresh")
        assert client.decide("fresh", "u-1").experiment == "fresh"
    with Client(edge.url, "rk_unknown_secret") as stranger, pytest.raises(AuthenticationError):
        stranger.decide("ranker-v2", "u-1")
    with Client(edge.url, make_key("ingest")) as ingest_only:
        edge.sync()
        with pytest.raises(PermissionDeniedError) as denied:
            ingest_only.decide("ranker-v2", "u-1")
        assert denied.value.code == "permission_denied"

    async def run_async() -> None:
        async with AsyncClient(edge.url, edge.key) as client:
            assert await client.decide("ranker-v2", "u-1") == decision
            assert await client.decide_many("ranker-v2", units) == many
            assert (await client.decide_all("u-1"))["ranker-v2"] == decision
            with pytest.raises(NotFoundError):
                await client.decide("no-such-experiment", "u-1")

    asyncio.run(run_async())


def test_track_stores_each_event_once_however_often_it_is_sent(edge: EdgeServer) -> None:
    moment = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
    # Large batches and a long interval: nothing is sent before flush().
    with Client(edge.url, edge.key, batch_size=1000, flush_interval_s=60) as client:
        ids = [client.track(f"u-{n}", "purchase", n + 0.5, timestamp=moment) for n in range(250)]
        given = client.track(7, "signup", event_id="signup-7", timestamp=1_700_000_000)
        assert client.buffered == 251
        assert client.flush() == TrackResult(accepted=251, duplicates=0)
        assert client.buffered == 0
        # The same events again, as a retry after a lost answer would send them.
        client.track_many(
            Event(f"u-{n}", "purchase", n + 0.5, moment, event_id) for n, event_id in enumerate(ids)
        )
        assert client.flush() == TrackResult(accepted=0, duplicates=250)
    assert given == "signup-7"
    assert all(uuid.UUID(event_id).version == 4 for event_id in ids)
    assert StoredEvent.objects.count() == 251
    stored = StoredEvent.objects.get(event_id=ids[10])
    assert (stored.unit_id, stored.name, stored.value, stored.timestamp) == (
        "u-10",
        "purchase",
        10.5,
        moment,
    )
    signup = StoredEvent.objects.get(event_id="signup-7")
    assert (signup.unit_id, signup.timestamp) == ("7", datetime.fromtimestamp(1_700_000_000, UTC))

    # The background flusher sends without flush(): full batches at once, the rest on time.
    with Client(edge.url, edge.key, batch_size=10, flush_interval_s=0.05) as client:
        for n in range(25):
            client.track(f"bg-{n}", "click")
        deadline = time.monotonic() + 10
        while StoredEvent.objects.filter(name="click").count() < 25:
            assert time.monotonic() < deadline, "the flusher did not send the events"
            time.sleep(0.02)
        assert client.buffered == 0

    async def run_async() -> TrackResult:
        async with AsyncClient(edge.url, edge.key, batch_size=1000, flush_interval_s=60) as client:
            for n in range(30):
                client.track(f"a-{n}", "add_to_cart", timestamp=moment)
            return await client.flush()

    assert asyncio.run(run_async()) == TrackResult(accepted=30, duplicates=0)
    assert StoredEvent.objects.filter(name="add_to_cart").count() == 30


# --- retries and buffering, on a mock server ----------------------------------------------


class Script:
    """A mock edge that plays a list of outcomes and records the event ids of each call."""

    def __init__(self, *outcomes: int | type[Exception]) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[list[str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)["events"]
        self.calls.append([event["event_id"] for event in events])
        outcome = self.outcomes.pop(0) if self.outcomes else 200
        if isinstance(outcome, type):
            raise outcome("scripted failure", request=request)
        if outcome == 200:
            return httpx.Response(200, json={"accepted": len(events), "duplicates": 0})
        if outcome == 400:
            error = {"code": "validation_error", "index": 1, "field": "value", "message": "bad"}
            return httpx.Response(400, json=_problem(400, "validation_error", errors=[error]))
        return httpx.Response(outcome, json=_problem(outcome, "store_unavailable"))


def _problem(status: int, code: str, **members: Any) -> dict[str, Any]:
    """A problem document as the edge writes it (routing.edge.problems)."""
    errors = members.pop("errors", [{"field": None, "code": code, "message": "x"}])
    first = errors[0]
    return {
        "type": f"urn:rampart:problem:{code}",
        "title": code,
        "status": status,
        "detail": f"detail of {code}",
        "code": code,
        "field": first["field"],
        "errors": errors,
        **({"index": first["index"]} if "index" in first else {}),
        **members,
    }


def _client(script: Script, **options: Any) -> Client:
    return Client(
        "http://edge",
        "rk_a_b",
        retry=FAST_RETRY,
        flush_interval_s=60,
        transport=httpx.MockTransport(script),
        **options,
    )


def test_5xx_and_connection_failures_are_retried_with_the_same_event_ids() -> None:
    script = Script(httpx.ConnectError, 503, 500)
    with _client(script) as client:
        ids = [client.track("u", "purchase") for _ in range(3)]
        assert client.flush() == TrackResult(accepted=3, duplicates=0)
    assert script.calls == [ids] * 4


def test_a_batch_that_keeps_failing_stays_buffered_and_is_sent_later() -> None:
    script = Script(503, 503, 503, 503, httpx.ReadTimeout, *[httpx.ConnectError] * 3)
    client = _client(script)
    ids = [client.track("u", "purchase") for _ in range(3)]
    with pytest.raises(ServerError) as failed:
        client.flush()
    assert failed.value.status == 503 and client.buffered == 3
    with pytest.raises(RampartConnectionError):
        client.flush()
    assert client.buffered == 3
    assert client.flush() == TrackResult(accepted=3, duplicates=0)
    client.close()
    assert script.calls == [ids] * 9


def test_a_batch_put_back_keeps_its_place_in_the_buffer() -> None:
    buffer = EventBuffer(max_events=3)
    events = [Event("u", "n", event_id=f"e-{n}") for n in range(4)]
    buffer.add(events[:3])
    first = buffer.take(2)
    buffer.add(events[3:])
    buffer.put_back(first)
    # Past the bound the newest event is dropped, never the batch being retried.
    assert [e.event_id for e in buffer.take(10)] == ["e-0", "e-1", "e-2"]
    assert buffer.dropped == 1


def test_a_refused_batch_is_not_retried_and_is_handed_back() -> None:
    script = Script(400)
    client = _client(script)
    ids = [client.track("u", "purchase") for _ in range(2)]
    with pytest.raises(BadRequestError) as refused:
        client.flush()
    assert (refused.value.code, refused.value.index, refused.value.field) == (
        "validation_error",
        1,
        "value",
    )
    assert refused.value.message == "detail of validation_error"
    assert [event.event_id for event in refused.value.events] == ids
    assert len(script.calls) == 1 and client.buffered == 0
    client.close()


def test_the_buffer_is_bounded() -> None:
    buffer = EventBuffer(max_events=5)
    assert buffer.add(Event(f"u-{n}", "click") for n in range(7)) == 5
    assert (len(buffer), buffer.dropped) == (5, 2)


def test_close_sends_what_is_buffered() -> None:
    script = Script()
    with _client(script, batch_size=10) as client:
        ids = [client.track(f"u-{n}", "click") for n in range(7)]
        assert script.calls == []
    assert script.calls == [ids]
    with pytest.raises(RampartError):
        client.track("u", "late")


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"unit_id": "", "name": "n"}, "unit_id"),
        ({"unit_id": "u" * 201, "name": "n"}, "unit_id"),
        ({"unit_id": None, "name": "n"}, "unit_id"),
        ({"unit_id": "u", "name": ""}, "name"),
        ({"unit_id": "u", "name": "a\x00b"}, "name"),
        ({"unit_id": "u", "name": "n", "value": math.nan}, "value"),
        ({"unit_id": "u", "name": "n", "value": "3"}, "value"),
        ({"unit_id": "u", "name": "n", "value": True}, "value"),
        ({"unit_id": "u", "name": "n", "timestamp": datetime(2026, 1, 1)}, "timestamp"),
        ({"unit_id": "u", "name": "n", "event_id": ""}, "event_id"),
        ({"unit_id": "u", "name": "n", "event_id": "e" * 129}, "event_id"),
    ],
)
def test_track_refuses_what_the_events_api_would_refuse(
    arguments: dict[str, Any], field: str
) -> None:
    script = Script()
    with _client(script) as client:
        args = {"value": 1.0, "timestamp": None, "event_id": None, **arguments}
        with pytest.raises(InvalidEventError) as caught:
            client.track(
                args["unit_id"],
                args["name"],
                args["value"],
                timestamp=args["timestamp"],
                event_id=args["event_id"],
            )
        assert caught.value.field == field and client.buffered == 0
    assert script.calls == []


def test_event_timestamps_keep_their_instant() -> None:
    script = Script()
    eastern = datetime(2026, 3, 1, 9, 0, tzinfo=timezone(timedelta(hours=-5)))
    with _client(script) as client:
        client.track("u", "n", timestamp=eastern, event_id="e-1")
        sent = Event("u", "n", timestamp=eastern, event_id="e-1").as_json()
    assert datetime.fromisoformat(sent["timestamp"]) == datetime(2026, 3, 1, 14, tzinfo=UTC)


def test_decision_errors_map_to_typed_exceptions_and_5xx_is_retried() -> None:
    answers = [
        httpx.Response(502, text="<html>bad gateway</html>"),
        httpx.Response(
            404,
            json=_problem(
                404,
                "experiment_not_found",
                errors=[{"field": "experiment", "code": "experiment_not_found", "message": "x"}],
            ),
            headers={"content-type": "application/problem+json"},
        ),
    ]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return answers.pop(0)

    client = Client(
        "http://edge/", "rk_a_b", retry=FAST_RETRY, transport=httpx.MockTransport(handler)
    )
    with pytest.raises(ExperimentNotFoundError) as missing:
        client.decide("x", "u")
    assert missing.value.field == "experiment" and seen == ["/v1/decide", "/v1/decide"]
    assert missing.value.message == "detail of experiment_not_found"
    down = Client(
        "http://edge",
        "rk_a_b",
        retry=RetryPolicy(max_retries=1, backoff_base_s=0.001),
        transport=httpx.MockTransport(lambda request: httpx.Response(503, text="down")),
    )
    with pytest.raises(ServerError) as failed:
        down.decide("x", "u")
    assert (failed.value.status, failed.value.code) == (503, "http_error")
    client.close()
    down.close()


def test_the_older_error_body_is_still_read() -> None:
    legacy = {"error": {"code": "not_found", "message": "unknown", "field": "experiment"}}
    client = Client(
        "http://edge",
        "rk_a_b",
        retry=FAST_RETRY,
        transport=httpx.MockTransport(lambda request: httpx.Response(404, json=legacy)),
    )
    with pytest.raises(NotFoundError) as missing:
        client.decide("x", "u")
    assert (missing.value.code, missing.value.message, missing.value.field) == (
        "not_found",
        "unknown",
        "experiment",
    )
    client.close()


def _not_on_edge(retry_after: str) -> httpx.Response:
    entry = {"field": "experiment", "code": "experiment_not_on_edge", "message": "x"}
    document = _problem(
        503, "experiment_not_on_edge", errors=[entry], retry_after_s=float(retry_after)
    )
    return httpx.Response(503, json=document, headers={"retry-after": retry_after})


def test_not_on_edge_is_retried_after_the_delay_the_edge_asks_for() -> None:
    answers = [_not_on_edge("0.05"), _not_on_edge("0.05")]
    sent: list[float] = []
    decision = {
        "experiment": "x",
        "unit": "u",
        "variant": "v1",
        "in_experiment": True,
        "reason": "assigned",
        "upstream": "http://m",
    }

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(time.monotonic())
        return answers.pop(0) if answers else httpx.Response(200, json=decision)

    policy = RetryPolicy(max_retries=3, backoff_base_s=0.001, backoff_cap_s=1.0)
    transport = httpx.MockTransport(handler)
    with Client("http://edge", "rk_a_b", retry=policy, transport=transport) as client:
        assert client.decide("x", "u").variant == "v1"
    assert len(sent) == 3
    assert all(later - earlier >= 0.05 for earlier, later in itertools.pairwise(sent))


def test_not_on_edge_longer_than_the_backoff_cap_is_raised_at_once_with_retry_after() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return _not_on_edge("60")

    transport = httpx.MockTransport(handler)
    with (
        Client("http://edge", "rk_a_b", retry=FAST_RETRY, transport=transport) as client,
        pytest.raises(ExperimentNotOnEdgeError) as lagging,
    ):
        client.decide("x", "u")
    assert (lagging.value.status, lagging.value.code, lagging.value.retry_after_s) == (
        503,
        "experiment_not_on_edge",
        60.0,
    )
    assert isinstance(lagging.value, ServerError) and len(calls) == 1

    async def run_async() -> ExperimentNotOnEdgeError:
        async with AsyncClient(
            "http://edge", "rk_a_b", retry=FAST_RETRY, transport=httpx.MockTransport(handler)
        ) as client:
            with pytest.raises(ExperimentNotOnEdgeError) as caught:
                await client.decide("x", "u")
            return caught.value

    assert asyncio.run(run_async()).retry_after_s == 60.0
    assert len(calls) == 2


def test_async_client_retries_and_puts_failed_batches_back() -> None:
    script = Script(503, 503)

    async def run() -> tuple[TrackResult, int, list[list[str]]]:
        client = AsyncClient(
            "http://edge",
            "rk_a_b",
            retry=RetryPolicy(max_retries=1, backoff_base_s=0.001),
            flush_interval_s=60,
            transport=httpx.MockTransport(script),
        )
        ids = [client.track("u", "purchase") for _ in range(2)]
        with pytest.raises(ServerError):
            await client.flush()
        kept = client.buffered
        result = await client.flush()
        await client.aclose()
        assert script.calls == [ids] * 3
        return result, kept, script.calls

    result, kept, _ = asyncio.run(run())
    assert (result, kept) == (TrackResult(accepted=2, duplicates=0), 2)
