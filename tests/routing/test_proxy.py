"""The routing proxy in process: the real edge and ProxyApp, driven through an ASGI client,
forwarding to real model servers on loopback; records checked against what the servers saw."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from experiments import services
from routing.edge.app import Edge, build_edge
from routing.edge.context import EdgeContext
from routing.models import Exposure, ObservationBucket
from routing.observe.histogram import LogHistogram
from routing.observe.shadow_pairs import PairCell
from routing.proxy.app import ProxyApp
from tests.model_server import ModelServer, closed_url
from tests.routing.problems import assert_problem

pytestmark = pytest.mark.django_db(transaction=True)

CLIENT_ADDRESS = "10.1.2.3"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ModelServer]]:
    """Three model versions that differ only in the score they answer."""
    started = {
        "control": ModelServer(name="control", score=0.5).start(),
        "canary": ModelServer(name="canary", score=0.75).start(),
        "shadow": ModelServer(name="shadow", score=0.625).start(),
    }
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(autouse=True)
def fresh_servers(servers: dict[str, ModelServer]) -> None:
    for name, server in servers.items():
        server.reset_counts()
        server.status = 200
        server.delay_s = 0.0
        server.score = {"control": 0.5, "canary": 0.75, "shadow": 0.625}[name]


@pytest.fixture
def proxy_settings(settings: Any) -> Any:
    settings.EDGE_REQUIRE_KEY = True
    settings.RECORDER_FLUSH_S = 60.0  # flushed on shutdown; the tests read rows after it
    settings.PROXY_BREAKER_FAILURES = 1000
    settings.PROXY_BREAKER_COOLDOWN_S = 10.0
    settings.PROXY_READ_TIMEOUT_S = 5.0
    settings.PROXY_CONNECT_TIMEOUT_S = 1.0
    return settings


def make_experiment(
    key: str,
    variants: list[tuple[str, str, float]],
    *,
    shadows: tuple[tuple[str, str], ...] = (),
    **extra: Any,
) -> int:
    """A running A/B test; the first variant is control. Returns its id."""
    inputs = [
        services.VariantInput(key=name, upstream_url=url, weight=weight, is_control=index == 0)
        for index, (name, url, weight) in enumerate(variants)
    ]
    inputs += [
        services.VariantInput(key=name, upstream_url=url, weight=0.0, is_shadow=True)
        for name, url in shadows
    ]
    experiment = services.experiment_create(
        actor="test", key=key, name=key, kind="ab", variants=inputs, **extra
    )
    services.experiment_start(actor="test", key=key)
    return int(experiment.id)


@dataclass
class Running:
    edge: Edge
    proxy: ProxyApp
    client: httpx.AsyncClient

    def units_for(self, experiment: str, variant: str, count: int) -> list[str]:
        route = self.proxy.context.snapshots.current.route(experiment)
        assert route is not None
        units = [f"u{i}" for i in range(2000) if route.decide(f"u{i}").variant == variant]
        assert len(units) >= count
        return units[:count]


@contextlib.asynccontextmanager
async def running_edge(key: str) -> AsyncIterator[Running]:
    """The edge with the proxy mounted, started as uvicorn would, and an ASGI client."""
    edge = build_edge(mounts={"/proxy/": ProxyApp}, context=EdgeContext.from_settings())
    await edge.startup()
    proxy = edge.mounts["/proxy/"]
    assert isinstance(proxy, ProxyApp)
    transport = httpx.ASGITransport(app=edge, client=(CLIENT_ADDRESS, 40000))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://edge", headers={"X-Rampart-Key": key}
        ) as client:
            yield Running(edge, proxy, client)
    finally:
        await edge.shutdown()


@dataclass
class Totals:
    count: int = 0
    error_count: int = 0
    fallback_count: int = 0
    cache_hits: int = 0
    latency_sum: float = 0.0
    compared_count: int = 0
    disagreement_count: int = 0
    abs_diff_sum: float = 0.0
    abs_diff_sum_sq: float = 0.0
    histogram_count: int = 0


def totals(experiment_id: int, variant: str, *, is_shadow: bool = False) -> Totals:
    """The sum of every ObservationBucket row of one arm (analysis merges rows the same way)."""
    result = Totals()
    histogram = LogHistogram()
    for row in ObservationBucket.objects.filter(
        experiment_id=experiment_id, variant_key=variant, is_shadow=is_shadow
    ):
        result.count += row.count
        result.error_count += row.error_count
        result.fallback_count += row.fallback_count
        result.cache_hits += row.cache_hits
        result.latency_sum += row.latency_sum
        result.compared_count += row.compared_count
        result.disagreement_count += row.disagreement_count
        result.abs_diff_sum += row.abs_diff_sum
        result.abs_diff_sum_sq += row.abs_diff_sum_sq
        if row.latency_histogram:
            histogram.merge(LogHistogram.from_json(row.latency_histogram))
    result.histogram_count = histogram.count
    assert histogram.sum == pytest.approx(result.latency_sum)
    return result


def run(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(scenario())


def test_forwards_method_path_query_headers_and_body(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    control = servers["control"]
    make_experiment("fwd", [("v1", control.url + "/base", 1.0), ("v2", servers["canary"].url, 0.0)])

    async def scenario() -> httpx.Response:
        async with running_edge(key) as running:
            return await running.client.post(
                "/proxy/fwd/predict/a%2Fb?x=1&y=two",
                content=b'{"features": [1, 2]}',
                headers={
                    "X-Rampart-Unit": "user-1",
                    "Authorization": "Bearer model-token",
                    "Connection": "keep-alive, x-drop-me",
                    "X-Drop-Me": "hop",
                    "Keep-Alive": "timeout=5",
                    "X-Forwarded-For": "192.0.2.7",
                    "Content-Type": "application/json",
                },
            )

    response = run(scenario)
    assert response.status_code == 200
    assert response.headers["x-rampart-experiment"] == "fwd"
    assert response.headers["x-rampart-variant"] == "v1"
    assert response.headers["x-model"] == "control"
    assert orjson.loads(response.content) == {"score": 0.5, "path": "/base/predict/a/b"}
    assert control.count == 1
    seen = control.received[0]
    assert (seen.method, seen.query, seen.body) == ("POST", "x=1&y=two", b'{"features": [1, 2]}')
    assert seen.headers["authorization"] == "Bearer model-token"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["x-rampart-unit"] == "user-1"
    assert seen.headers["x-forwarded-for"] == f"192.0.2.7, {CLIENT_ADDRESS}"
    assert seen.headers["host"] == f"127.0.0.1:{control.port}"
    for dropped in ("x-rampart-key", "keep-alive", "x-drop-me", "te", "transfer-encoding"):
        assert dropped not in seen.headers
    # End-to-end headers pass unchanged; aiohttp adds none of its own.
    assert seen.headers["user-agent"].startswith("python-httpx/")
    assert seen.raw_path == "/base/predict/a%2Fb"


def test_same_unit_same_variant_same_header(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    experiment_id = make_experiment(
        "sticky", [("v1", servers["control"].url, 0.5), ("v2", servers["canary"].url, 0.5)]
    )
    units = [f"unit-{i}" for i in range(40)]

    async def scenario() -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
        async with running_edge(key) as running:
            seen: dict[str, list[str]] = {}
            models: dict[str, str] = {}
            for _ in range(2):
                for unit in units:
                    response = await running.client.get(
                        "/proxy/sticky/score", headers={"X-Rampart-Unit": unit}
                    )
                    assert response.status_code == 200
                    seen.setdefault(unit, []).append(response.headers["x-rampart-variant"])
                    models[unit] = response.headers["x-model"]
            decided = {}
            for unit in units:
                answer = await running.client.get(
                    "/v1/decide", params={"experiment": "sticky", "unit": unit}
                )
                decided[unit] = answer.json()["variant"]
            return seen, models, decided

    seen, models, decided = run(scenario)
    model_of = {"v1": "control", "v2": "canary"}
    for unit in units:
        first, second = seen[unit]
        assert first == second == decided[unit]
        assert models[unit] == model_of[first]
    assert {variants[0] for variants in seen.values()} == {"v1", "v2"}
    exposures = dict(
        Exposure.objects.filter(experiment_id=experiment_id).values_list("unit_id", "variant_key")
    )
    assert exposures == decided
    in_v2 = sum(1 for variants in seen.values() if variants[0] == "v2")
    assert servers["canary"].count == 2 * in_v2
    assert servers["control"].count == 2 * (len(units) - in_v2)


@pytest.mark.parametrize(
    ("unit_source", "unit_attribute", "request_kwargs"),
    [
        ("cookie", "uid", {"headers": {"Cookie": "theme=dark; uid=unit-7"}}),
        ("json_field", "user_id", {"content": b'{"user_id": "unit-7", "x": [1]}'}),
        ("query", "user", {"params": {"user": "unit-7", "q": "1"}}),
        ("header", "X-User", {"headers": {"X-User": "unit-7"}}),
        # A unit header the proxy also reads for itself is still the unit (and forwarded).
        ("header", "Cookie", {"headers": {"Cookie": "unit-7"}}),
    ],
)
def test_unit_from_cookie_json_query_or_named_header(
    proxy_settings: Any,
    make_key: Callable[..., str],
    servers: dict[str, ModelServer],
    unit_source: str,
    unit_attribute: str,
    request_kwargs: dict[str, Any],
) -> None:
    key = make_key("decide")
    experiment_id = make_experiment(
        "units",
        [("v1", servers["control"].url, 0.5), ("v2", servers["canary"].url, 0.5)],
        unit_source=unit_source,
        unit_attribute=unit_attribute,
    )

    async def scenario() -> tuple[httpx.Response, str]:
        async with running_edge(key) as running:
            route = running.proxy.context.snapshots.current.route("units")
            assert route is not None
            response = await running.client.post("/proxy/units/p", **request_kwargs)
            return response, route.decide("unit-7").variant

    response, expected = run(scenario)
    assert response.status_code == 200
    assert response.headers["x-rampart-variant"] == expected
    assert list(
        Exposure.objects.filter(experiment_id=experiment_id).values_list("unit_id", "variant_key")
    ) == [("unit-7", expected)]


def test_request_without_unit_goes_to_control_and_is_not_an_error(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    experiment_id = make_experiment(
        "nounit", [("v1", servers["control"].url, 0.0), ("v2", servers["canary"].url, 1.0)]
    )

    async def scenario() -> list[httpx.Response]:
        async with running_edge(key) as running:
            return [await running.client.get("/proxy/nounit/x") for _ in range(3)]

    responses = run(scenario)
    assert [r.headers["x-rampart-variant"] for r in responses] == ["v1"] * 3
    assert servers["control"].count == 3 and servers["canary"].count == 0
    control = totals(experiment_id, "v1")
    assert (control.count, control.error_count) == (3, 0)
    assert not Exposure.objects.filter(experiment_id=experiment_id).exists()


def test_a_unit_with_a_nul_counts_as_no_unit(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    # /v1/decide refuses such a unit with 400 (its exposure could not be stored); the proxy
    # still answers, from control, as for a request without a unit.
    key = make_key("decide")
    experiment_id = make_experiment(
        "nul",
        [("v1", servers["control"].url, 0.0), ("v2", servers["canary"].url, 1.0)],
        unit_source="query",
        unit_attribute="user",
    )

    async def scenario() -> httpx.Response:
        async with running_edge(key) as running:
            return await running.client.get("/proxy/nul/x", params={"user": "a\x00b"})

    response = run(scenario)
    assert response.status_code == 200
    assert response.headers["x-rampart-variant"] == "v1"
    assert servers["canary"].count == 0
    assert not Exposure.objects.filter(experiment_id=experiment_id).exists()


def test_auth_unknown_experiment_and_body_limit(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    proxy_settings.PROXY_MAX_BODY_BYTES = 1000
    key = make_key("decide")
    ingest_only = make_key("ingest")
    make_experiment(
        "limits", [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0)]
    )

    async def chunked_body() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 300

    async def scenario() -> dict[str, httpx.Response]:
        async with running_edge(key) as running:
            client = running.client
            return {
                "no_key": await client.get("/proxy/limits/p", headers={"X-Rampart-Key": ""}),
                "wrong_scope": await client.get(
                    "/proxy/limits/p", headers={"X-Rampart-Key": ingest_only}
                ),
                "bearer": await client.get(
                    "/proxy/limits/p",
                    headers={"X-Rampart-Key": "", "Authorization": f"Bearer {key}"},
                ),
                "unknown": await client.get("/proxy/nope/p"),
                "sized": await client.post("/proxy/limits/p", content=b"y" * 1001),
                "chunked": await client.post("/proxy/limits/p", content=chunked_body()),
                "fits": await client.post("/proxy/limits/p", content=b"z" * 1000),
            }

    responses = run(scenario)
    assert responses["no_key"].status_code == 401
    assert responses["wrong_scope"].status_code == 403
    assert responses["bearer"].status_code == 200
    assert_problem(responses["no_key"], 401, "not_authenticated")
    assert_problem(responses["wrong_scope"], 403, "permission_denied")
    assert_problem(responses["unknown"], 404, "experiment_not_found", "experiment")
    for name in ("sized", "chunked"):
        assert_problem(responses[name], 413, "payload_too_large")
    assert responses["fits"].status_code == 200
    # Only the two accepted requests reached the model, and the Rampart key in the
    # Authorization header was not passed on.
    assert servers["control"].count == 2
    assert "authorization" not in servers["control"].received[0].headers


def test_failed_arm_falls_back_to_control_and_counts_against_the_arm(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    canary = servers["canary"]
    canary.status = 503
    experiment_id = make_experiment(
        "fallback", [("v1", servers["control"].url, 0.0), ("v2", canary.url, 1.0)]
    )
    down_id = make_experiment(
        "fallback-down", [("v1", servers["control"].url, 0.0), ("v2", closed_url(), 1.0)]
    )

    async def scenario() -> list[httpx.Response]:
        async with running_edge(key) as running:
            responses = []
            for experiment in ("fallback", "fallback-down"):
                for unit in ("a", "b", "c", "d"):
                    responses.append(
                        await running.client.post(
                            f"/proxy/{experiment}/p", headers={"X-Rampart-Unit": unit}
                        )
                    )
            return responses

    responses = run(scenario)
    for response in responses:
        assert response.status_code == 200
        assert response.headers["x-rampart-variant"] == "v2"
        assert response.headers["x-rampart-served-by"] == "v1"
        assert response.headers["x-model"] == "control"
    assert canary.count == 4
    assert servers["control"].count == 8
    for exp_id in (experiment_id, down_id):
        arm = totals(exp_id, "v2")
        assert (arm.count, arm.error_count, arm.fallback_count, arm.histogram_count) == (4, 4, 4, 4)
        # Control's answers to the other arm's users are not control's own observations.
        assert totals(exp_id, "v1").count == 0


def test_without_fallback_the_failure_reaches_the_client(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    proxy_settings.PROXY_READ_TIMEOUT_S = 0.2
    key = make_key("decide")
    servers["canary"].status = 503
    make_experiment(
        "nofb",
        [("v1", servers["control"].url, 0.0), ("v2", servers["canary"].url, 1.0)],
        fallback_to_control=False,
    )
    make_experiment("ctl-down", [("v1", closed_url(), 1.0), ("v2", servers["canary"].url, 0.0)])
    make_experiment(
        "ctl-slow", [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0.0)]
    )

    async def scenario() -> dict[str, httpx.Response]:
        async with running_edge(key) as running:
            client = running.client
            return {
                "5xx": await client.get("/proxy/nofb/p", headers={"X-Rampart-Unit": "a"}),
                "down": await client.get("/proxy/ctl-down/p", headers={"X-Rampart-Unit": "a"}),
                "slow": await client.get(
                    "/proxy/ctl-slow/p", headers={"X-Rampart-Unit": "a", "X-Model-Delay": "1"}
                ),
            }

    responses = run(scenario)
    assert responses["5xx"].status_code == 503
    assert responses["5xx"].headers["x-model"] == "canary"
    assert_problem(responses["down"], 502, "upstream_unavailable")
    assert_problem(responses["slow"], 504, "upstream_timeout")
    assert servers["control"].count == 1


def test_breaker_opens_short_circuits_to_control_and_recovers_after_a_probe(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    proxy_settings.PROXY_BREAKER_FAILURES = 3
    proxy_settings.PROXY_BREAKER_COOLDOWN_S = 0.3
    key = make_key("decide")
    canary = servers["canary"]
    canary.status = 500
    experiment_id = make_experiment(
        "breaker", [("v1", servers["control"].url, 0.0), ("v2", canary.url, 1.0)]
    )

    async def scenario() -> tuple[list[str], list[str], str, str]:
        async with running_edge(key) as running:
            client = running.client

            async def served_by() -> str:
                response = await client.get("/proxy/breaker/p", headers={"X-Rampart-Unit": "u"})
                assert response.status_code == 200
                return response.headers["x-model"]

            while_failing = [await served_by() for _ in range(8)]
            breaker = running.proxy.breakers[canary.url]
            state_open = breaker.state
            canary.status = 200
            still_open = [await served_by() for _ in range(2)]
            await asyncio.sleep(0.35)
            after_cooldown = [await served_by() for _ in range(3)]
            return while_failing, still_open + after_cooldown, state_open, breaker.state

    while_failing, later, state_open, final_state = run(scenario)
    assert while_failing == ["control"] * 8
    assert state_open == "open"
    # Three failures opened the breaker; the other five never reached the canary.
    assert later == ["control", "control", "canary", "canary", "canary"]
    assert final_state == "closed"
    assert canary.count == 3 + 3
    arm = totals(experiment_id, "v2")
    assert arm.count == 13
    assert arm.error_count == arm.fallback_count == 10
    assert arm.histogram_count == 3 + 3  # short-circuited requests have no latency


def test_shadow_gets_a_copy_in_the_background_and_is_compared_with_control(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    shadow = servers["shadow"]
    shadow.delay_s = 0.3
    experiment_id = make_experiment(
        "shadowed",
        [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0.0)],
        shadows=(("v3", shadow.url),),
        shadow_compare_field="score",
    )
    requests = 6

    async def scenario() -> tuple[float, list[httpx.Response]]:
        async with running_edge(key) as running:
            started = time.perf_counter()
            responses = await asyncio.gather(
                *(
                    running.client.post(
                        f"/proxy/shadowed/p{i}", headers={"X-Rampart-Unit": f"u{i}"}
                    )
                    for i in range(requests)
                )
            )
            elapsed = time.perf_counter() - started
            while running.proxy.shadows_in_flight:
                await asyncio.sleep(0.02)
            return elapsed, responses

    elapsed, responses = run(scenario)
    assert elapsed < 0.25, "the user waited for the shadow"
    assert all(r.headers["x-model"] == "control" for r in responses)
    assert shadow.count == requests
    assert all(seen.headers["x-rampart-shadow"] == "1" for seen in shadow.received)
    assert sorted(seen.path for seen in shadow.received) == [f"/p{i}" for i in range(requests)]
    mirrored = totals(experiment_id, "v3", is_shadow=True)
    assert (mirrored.count, mirrored.error_count, mirrored.histogram_count) == (
        requests,
        0,
        requests,
    )
    assert mirrored.latency_sum >= requests * 300
    assert (mirrored.compared_count, mirrored.disagreement_count) == (requests, requests)
    # |0.625 - 0.5| per pair.
    assert mirrored.abs_diff_sum == pytest.approx(requests * 0.125)
    assert mirrored.abs_diff_sum_sq == pytest.approx(requests * 0.125**2)
    assert totals(experiment_id, "v1").count == requests
    # Each user's shadow answer is paired with control's latency on the same request.
    pairs = _pairs(experiment_id, "v3")
    assert pairs.n == pairs.control.count == pairs.shadow.count == requests
    assert pairs.s >= requests * 300 > pairs.c
    assert pairs.s == pytest.approx(mirrored.latency_sum, rel=0.01)


def _pairs(experiment_id: int, variant: str) -> PairCell:
    pairs = PairCell()
    for text in ObservationBucket.objects.filter(
        experiment_id=experiment_id, variant_key=variant, is_shadow=True
    ).values_list("pairs", flat=True):
        if text:
            pairs.merge(PairCell.from_json(text))
    return pairs


def test_a_user_gives_one_pair_its_first_mirrored_request(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    shadow = servers["shadow"]
    shadow.score = 0.625
    experiment_id = make_experiment(
        "one-pair",
        [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0.0)],
        shadows=(("v3", shadow.url),),
        shadow_compare_field="score",
    )

    async def scenario() -> None:
        async with running_edge(key) as running:
            for unit in ("u1", "u1", "u1", "u2", "u2"):
                response = await running.client.post(
                    "/proxy/one-pair/p", headers={"X-Rampart-Unit": unit}
                )
                assert response.status_code == 200
            while running.proxy.shadows_in_flight:
                await asyncio.sleep(0.02)

    run(scenario)
    mirrored = totals(experiment_id, "v3", is_shadow=True)
    assert (mirrored.compared_count, mirrored.disagreement_count) == (5, 5)
    pairs = _pairs(experiment_id, "v3")
    assert (pairs.n, pairs.d) == (2, 2)
    assert pairs.a == pytest.approx(2 * 0.125)


def test_a_failing_shadow_gives_its_users_pairs_that_differ(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    failing = ModelServer(name="failing", status=503).start()
    try:
        experiment_id = make_experiment(
            "failing-shadow",
            [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0.0)],
            shadows=(("v3", failing.url),),
        )

        async def scenario() -> None:
            async with running_edge(key) as running:
                for unit in ("u1", "u1", "u2"):
                    response = await running.client.get(
                        "/proxy/failing-shadow/p", headers={"X-Rampart-Unit": unit}
                    )
                    assert response.status_code == 200
                while running.proxy.shadows_in_flight:
                    await asyncio.sleep(0.02)

        run(scenario)
    finally:
        failing.stop()
    mirrored = totals(experiment_id, "v3", is_shadow=True)
    assert (mirrored.count, mirrored.error_count, mirrored.compared_count) == (3, 3, 0)
    pairs = _pairs(experiment_id, "v3")
    assert (pairs.n, pairs.d) == (2, 2)


def test_shadow_whole_body_comparison_and_saturation(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    proxy_settings.PROXY_SHADOW_CONCURRENCY = 2
    key = make_key("decide")
    shadow = servers["shadow"]
    shadow.score = 0.5  # same answer as control: byte-identical bodies
    shadow.delay_s = 0.2
    experiment_id = make_experiment(
        "saturated",
        [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0.0)],
        shadows=(("v3", shadow.url),),
    )

    async def scenario() -> None:
        async with running_edge(key) as running:
            for i in range(5):
                response = await running.client.get(
                    "/proxy/saturated/same", headers={"X-Rampart-Unit": f"u{i}"}
                )
                assert response.status_code == 200
            while running.proxy.shadows_in_flight:
                await asyncio.sleep(0.02)

    run(scenario)
    assert shadow.count == 2  # three copies were dropped: two were already in flight
    mirrored = totals(experiment_id, "v3", is_shadow=True)
    assert (mirrored.count, mirrored.compared_count, mirrored.disagreement_count) == (2, 2, 0)
    assert mirrored.abs_diff_sum == 0.0


def test_prediction_cache_hits_are_marked_counted_and_kept_out_of_latency(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    control = servers["control"]
    experiment_id = make_experiment(
        "cached",
        [("v1", control.url, 1.0), ("v2", servers["canary"].url, 0.0)],
        cache_ttl_s=60,
        cache_max_entries=2,
    )

    async def scenario() -> list[httpx.Response]:
        async with running_edge(key) as running:
            post = running.client.post
            return [
                await post("/proxy/cached/p", content=b"a", headers={"X-Rampart-Unit": "u1"}),
                await post("/proxy/cached/p", content=b"a", headers={"X-Rampart-Unit": "u2"}),
                await post("/proxy/cached/p", content=b"b", headers={"X-Rampart-Unit": "u1"}),
                await post("/proxy/cached/q", content=b"a", headers={"X-Rampart-Unit": "u1"}),
                # "a" on /p was evicted (two entries at most): a miss again.
                await post("/proxy/cached/p", content=b"a", headers={"X-Rampart-Unit": "u1"}),
                await post("/proxy/cached/q", content=b"a", headers={"X-Rampart-Unit": "u1"}),
            ]

    responses = run(scenario)
    hits = [r.headers.get("x-rampart-cache") == "hit" for r in responses]
    assert hits == [False, True, False, False, False, True]
    assert responses[1].content == responses[0].content
    assert responses[1].headers["x-rampart-variant"] == "v1"
    assert control.count == 4
    arm = totals(experiment_id, "v1")
    assert (arm.count, arm.cache_hits, arm.histogram_count) == (4, 2, 4)


def test_streamed_answer_passes_through_intact(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    experiment_id = make_experiment(
        "stream", [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0.0)]
    )
    size = 3 * 1024 * 1024 + 5

    async def scenario() -> httpx.Response:
        async with running_edge(key) as running:
            return await running.client.get(
                "/proxy/stream/big", headers={"X-Rampart-Unit": "u", "X-Model-Stream": str(size)}
            )

    response = run(scenario)
    assert response.status_code == 200
    assert response.content == b"x" * size
    assert "content-length" not in response.headers or response.headers["content-length"] == str(
        size
    )
    assert totals(experiment_id, "v1").histogram_count == 1


def test_recorded_aggregates_match_what_the_servers_did(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    proxy_settings.RECORDER_FLUSH_S = 0.1  # several flushes: rows of one bucket must add up
    key = make_key("decide")
    control, canary = servers["control"], servers["canary"]
    control.delay_s = 0.02
    canary.delay_s = 0.05
    experiment_id = make_experiment(
        "agg", [("v1", control.url, 0.5), ("v2", canary.url, 0.5)], fallback_to_control=False
    )
    units = [f"agg-{i}" for i in range(60)]
    failing = {unit for unit in units[::6]}

    async def scenario() -> list[tuple[httpx.Response, float]]:
        async with running_edge(key) as running:
            semaphore = asyncio.Semaphore(10)

            async def one(unit: str) -> tuple[httpx.Response, float]:
                headers = {"X-Rampart-Unit": unit}
                if unit in failing:
                    headers["X-Model-Status"] = "502"
                async with semaphore:
                    started = time.perf_counter()
                    response = await running.client.post("/proxy/agg/p", headers=headers)
                    return response, (time.perf_counter() - started) * 1000.0

            return await asyncio.gather(*(one(unit) for unit in units))

    results = run(scenario)
    # A model thread counts a request as completed just after sending its answer, which can
    # be a moment after the proxy has passed the answer on.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and (
        control.completed < control.count or canary.completed < canary.count
    ):
        time.sleep(0.01)
    for server, variant, delay_ms in ((control, "v1", 20.0), (canary, "v2", 50.0)):
        arm = totals(experiment_id, variant)
        served = [(r, ms) for r, ms in results if r.headers["x-rampart-variant"] == variant]
        assert arm.count == server.count == server.completed == len(served)
        assert arm.error_count == sum(1 for r, _ in served if r.status_code == 502)
        assert arm.histogram_count == arm.count
        # Each upstream call took at least the server's delay and at most what the client
        # waited for the whole proxied request.
        client_ms = sum(ms for _, ms in served)
        assert delay_ms * arm.count <= arm.latency_sum <= client_ms
    assert ObservationBucket.objects.filter(experiment_id=experiment_id).count() >= 2


def test_client_disconnect_cancels_the_upstream_call_and_frees_the_connection(
    proxy_settings: Any, make_key: Callable[..., str], servers: dict[str, ModelServer]
) -> None:
    key = make_key("decide")
    control = servers["control"]
    experiment_id = make_experiment(
        "leave", [("v1", control.url, 1.0), ("v2", servers["canary"].url, 0.0)]
    )
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/proxy/leave/slow",
        "raw_path": b"/proxy/leave/slow",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"x-rampart-key", key.encode()),
            (b"x-rampart-unit", b"u1"),
            (b"x-model-delay", b"2"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("edge", 80),
    }

    async def scenario() -> tuple[list[dict[str, Any]], float, int, int]:
        async with running_edge(key) as running:
            sent: list[dict[str, Any]] = []
            requested = False

            async def receive() -> dict[str, Any]:
                nonlocal requested
                if not requested:
                    requested = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                await asyncio.sleep(0.1)  # the client gives up after 100 ms
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            started = time.perf_counter()
            await running.edge(scope, receive, send)
            elapsed = time.perf_counter() - started
            deadline = time.monotonic() + 2
            while control.disconnects < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            connector = running.proxy.connector
            assert connector is not None
            # aiohttp keeps no public pool statistics: _acquired holds connections in use,
            # _conns the idle keep-alive ones.
            in_use = len(connector._acquired)
            idle = sum(len(conns) for conns in connector._conns.values())
            return sent, elapsed, in_use, idle

    sent, elapsed, in_use, idle = run(scenario)
    assert sent == []
    assert elapsed < 1.0, "the proxy kept waiting for the upstream after the client left"
    assert (control.count, control.disconnects, control.completed) == (1, 1, 0)
    # The cancelled connection was closed, not returned to the pool half-read.
    assert (in_use, idle) == (0, 0)
    arm = totals(experiment_id, "v1")
    assert (arm.count, arm.error_count, arm.histogram_count) == (1, 0, 1)
    assert 100.0 <= arm.latency_sum < 1000.0


def test_no_key_needed_when_the_edge_does_not_require_one(
    proxy_settings: Any, servers: dict[str, ModelServer]
) -> None:
    proxy_settings.EDGE_REQUIRE_KEY = False
    make_experiment("open", [("v1", servers["control"].url, 1.0), ("v2", servers["canary"].url, 0)])

    async def scenario() -> httpx.Response:
        async with running_edge("") as running:
            return await running.client.get("/proxy/open", headers={"X-Rampart-Key": ""})

    response = run(scenario)
    assert response.status_code == 200
    # "/proxy/{experiment}" without a path forwards to the upstream's root.
    assert servers["control"].received[0].path == "/"
