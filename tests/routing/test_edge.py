"""The edge ASGI app: decide, batch, config with ETag, key checks, errors, mounts, lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from django.db import OperationalError, connections

from experiments import services
from routing.edge.app import Edge, build_edge
from routing.edge.asgi import Receive, Scope, Send, send_json
from routing.edge.context import EdgeContext
from routing.models import Exposure
from routing.observe.recorder import ExposureRecorder
from routing.snapshot import SnapshotHolder, load_snapshot, read_config_version
from tests.factories import create_experiment
from tests.routing.problems import assert_problem

_T = TypeVar("_T")


class Client:
    """Calls the edge in process through httpx's ASGI transport (no lifespan)."""

    def __init__(self, app: Edge) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(call())


class Recording:
    """A mounted part that remembers the paths it was given."""

    def __init__(self, context: EdgeContext) -> None:
        self.context = context
        self.paths: list[str] = []
        self.events: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append(scope["path"])
        await send_json(send, 200, b'{"mounted": true}')

    async def startup(self) -> None:
        self.events.append("startup")

    async def shutdown(self) -> None:
        self.events.append("shutdown")


async def django_stand_in(scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, 200, orjson.dumps({"fallback": scope["path"]}))


def _closing_in_loop(read: Callable[[], _T]) -> Callable[[], _T]:
    """``read``, closing the connection it opened when called from the event loop.

    That connection belongs to the loop task's context (asgiref's Local), which no one
    would close otherwise.
    """

    def wrapped() -> _T:
        try:
            return read()
        finally:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                for opened in connections.all(initialized_only=True):
                    opened.close()

    return wrapped


@pytest.fixture
def edge(
    metrics: Any, make_key: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Edge, Client, str]]:
    # The holder is not started: a miss confirms the config version in the event loop's
    # thread (SnapshotHolder._confirm), on a connection of its own, which sees what the
    # test committed (hence transactional tests).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    create_experiment("ranker-v2", "ab")
    services.experiment_start(actor="test", key="ranker-v2")
    key = make_key("decide")
    context = EdgeContext(
        snapshots=SnapshotHolder(
            refresh_s=60,
            loader=_closing_in_loop(load_snapshot),
            version_reader=_closing_in_loop(read_config_version),
        ),
        exposures=ExposureRecorder(flush_s=60),
        require_key=True,
    )
    context.snapshots.refresh_now()
    app = build_edge(mounts={"/proxy/": Recording}, fallback=django_stand_in, context=context)
    yield app, Client(app), key


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.django_db(transaction=True)
def test_decide_get_and_post_agree_and_record_one_exposure(edge: tuple[Edge, Client, str]) -> None:
    app, client, key = edge
    got = client.request(
        "GET", "/v1/decide", params={"experiment": "ranker-v2", "unit": "u-1"}, headers=_auth(key)
    )
    assert got.status_code == 200, got.text
    body = got.json()
    assert set(body) == {"experiment", "unit", "variant", "in_experiment", "reason", "upstream"}
    assert body["experiment"] == "ranker-v2" and body["unit"] == "u-1"
    assert body["reason"] == "assigned" and body["in_experiment"] is True
    assert (
        body["upstream"]
        == {"v1": "http://127.0.0.1:9001", "v2": "http://127.0.0.1:9002"}[body["variant"]]
    )
    posted = client.request(
        "POST", "/v1/decide", json={"experiment": "ranker-v2", "unit": "u-1"}, headers=_auth(key)
    )
    assert posted.json() == body
    app.context.exposures.flush_now()
    assert list(Exposure.objects.values_list("unit_id", "variant_key")) == [
        ("u-1", body["variant"])
    ]


@pytest.mark.django_db(transaction=True)
def test_query_values_are_percent_decoded(edge: tuple[Edge, Client, str]) -> None:
    _, client, key = edge
    unit = "anna+b é/1&x=2"
    body = client.request(
        "GET", "/v1/decide", params={"experiment": "ranker-v2", "unit": unit}, headers=_auth(key)
    ).json()
    assert body["unit"] == unit
    # The first value of a repeated parameter wins, as in parse_qs(...)[name][0].
    first = client.request(
        "GET", "/v1/decide?experiment=ranker-v2&unit=a&unit=b", headers=_auth(key)
    ).json()
    assert first["unit"] == "a"


@pytest.mark.django_db(transaction=True)
def test_not_running_experiments_record_nothing(edge: tuple[Edge, Client, str]) -> None:
    app, client, key = edge
    services.experiment_pause(actor="test", key="ranker-v2")
    app.context.snapshots.check_now()
    body = client.request(
        "GET", "/v1/decide?experiment=ranker-v2&unit=u-1", headers=_auth(key)
    ).json()
    assert (body["variant"], body["reason"], body["in_experiment"]) == ("v1", "not_running", False)
    app.context.exposures.flush_now()
    assert not Exposure.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("url", "status", "code", "field"),
    [
        ("/v1/decide?unit=u", 400, "validation_error", "experiment"),
        ("/v1/decide?experiment=ranker-v2", 400, "validation_error", "unit"),
        ("/v1/decide?experiment=nope&unit=u", 404, "experiment_not_found", "experiment"),
        ("/v1/nothing-here", 404, "not_found", None),
        # Invalid UTF-8 after percent-decoding: refused, never replaced by U+FFFD.
        ("/v1/decide?experiment=ranker-v2&unit=bad%FF", 400, "invalid_encoding", "unit"),
        ("/v1/decide?experiment=ranker-v2&unit=bad%C3", 400, "invalid_encoding", "unit"),
        ("/v1/decide?experiment=r%FFnker&unit=u", 400, "invalid_encoding", "experiment"),
    ],
)
def test_errors_name_the_field(
    edge: tuple[Edge, Client, str], url: str, status: int, code: str, field: str | None
) -> None:
    _, client, key = edge
    assert_problem(client.request("GET", url, headers=_auth(key)), status, code, field)


@pytest.mark.django_db(transaction=True)
def test_raw_query_bytes_that_are_not_utf8_are_refused(edge: tuple[Edge, Client, str]) -> None:
    app, _, key = edge
    for query, status in [
        (b"experiment=ranker-v2&unit=bad\xff", 400),
        (b"experiment=ranker-v2&unit=u-1&other=\xff", 200),  # a parameter the edge ignores
    ]:
        response = asyncio.run(_call(app, "GET", "/v1/decide", query, key))
        assert response[0] == status, response
        if status == 400:
            body = orjson.loads(response[2])
            assert (body["code"], body["field"]) == ("invalid_encoding", "unit")
            assert response[1][b"content-type"] == b"application/problem+json"
    app.context.exposures.flush_now()
    assert list(Exposure.objects.values_list("unit_id", flat=True)) == ["u-1"]


async def _call(
    app: Edge, method: str, path: str, query: bytes, key: str, body: bytes = b""
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request straight through the ASGI interface (raw bytes a client library refuses)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b"{not json", "malformed_json", None),
        (b"[1, 2]", "validation_error", None),
        (b'{"experiment": "ranker-v2", "unit": ["a"]}', "validation_error", "unit"),
        (b'{"experiment": "ranker-v2", "unit": "' + b"x" * 201 + b'"}', "validation_error", "unit"),
        # A NUL could not be stored with the exposure (PostgreSQL text).
        (b'{"experiment": "ranker-v2", "unit": "a\\u0000b"}', "validation_error", "unit"),
        (b'{"experiment": 3, "unit": "a"}', "validation_error", "experiment"),
        (b'{"experiment": "ranker-v2", "unit": "a", "units": 1}', "unknown_field", "units"),
        (b'{"experiment": "ranker-v2", "unit": "bad\xff"}', "invalid_encoding", "unit"),
        (b'{"experiment": "ranker-v2", "unit": "bad\\udcff"}', "invalid_encoding", "unit"),
    ],
)
def test_bad_post_bodies_are_400(
    edge: tuple[Edge, Client, str], body: bytes, code: str, field: str | None
) -> None:
    app, client, key = edge
    response = client.request("POST", "/v1/decide", content=body, headers=_auth(key))
    assert_problem(response, 400, code, field)
    app.context.exposures.flush_now()
    assert not Exposure.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_keys_are_checked_against_the_snapshot(
    edge: tuple[Edge, Client, str], make_key: Callable[..., str]
) -> None:
    app, client, key = edge
    url = "/v1/decide?experiment=ranker-v2&unit=u"
    anonymous = client.request("GET", url)
    assert_problem(anonymous, 401, "not_authenticated")
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert client.request("GET", url, headers=_auth("rk_bad_key")).status_code == 401
    assert client.request("GET", url, headers={"X-Rampart-Key": key}).status_code == 200
    ingest_only = make_key("ingest")
    # The new key is unknown until the snapshot picks up the config version it bumped.
    assert client.request("GET", url, headers=_auth(ingest_only)).status_code == 401
    app.context.snapshots.check_now()
    forbidden = client.request("GET", url, headers=_auth(ingest_only))
    assert_problem(forbidden, 403, "permission_denied")
    services.api_key_revoke(actor="test", prefix=key.split("_")[1])
    app.context.snapshots.check_now()
    assert client.request("GET", url, headers=_auth(key)).status_code == 401
    app.context.require_key = False
    assert client.request("GET", url).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_batch_for_many_units_and_for_every_running_experiment(
    edge: tuple[Edge, Client, str],
) -> None:
    app, client, key = edge
    create_experiment("other", "ab")
    services.experiment_start(actor="test", key="other")
    create_experiment("draft-one", "ab")
    app.context.snapshots.check_now()
    units = [f"u-{i}" for i in range(50)]
    many = client.request(
        "POST",
        "/v1/decide/batch",
        json={"experiment": "ranker-v2", "units": units},
        headers=_auth(key),
    )
    assert many.status_code == 200
    decisions = many.json()["decisions"]
    assert [d["unit"] for d in decisions] == units
    single = client.request(
        "GET", "/v1/decide?experiment=ranker-v2&unit=u-7", headers=_auth(key)
    ).json()
    assert decisions[7] == single
    every = client.request("POST", "/v1/decide/batch", json={"unit": "u-7"}, headers=_auth(key))
    assert [d["experiment"] for d in every.json()["decisions"]] == ["other", "ranker-v2"]
    listed = client.request(
        "POST",
        "/v1/decide/batch",
        json={"unit": "u-7", "experiments": ["draft-one"]},
        headers=_auth(key),
    )
    assert listed.json()["decisions"][0]["reason"] == "not_running"
    too_many = client.request(
        "POST",
        "/v1/decide/batch",
        json={"experiment": "ranker-v2", "units": ["u"] * 1001},
        headers=_auth(key),
    )
    assert_problem(too_many, 400, "validation_error", "units")
    app.context.exposures.flush_now()
    assert Exposure.objects.filter(unit_id="u-7").count() == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("body", "code", "field", "index"),
    [
        (
            {"experiment": "ranker-v2", "units": ["u-1", "u-2", None, "u-4"]},
            "validation_error",
            "units[2]",
            2,
        ),
        (
            {"experiment": "ranker-v2", "units": ["u-1", "u-2", "x" * 201]},
            "validation_error",
            "units[2]",
            2,
        ),
        (
            {"experiment": "ranker-v2", "units": ["u-1", "u-2", "a\x00b"]},
            "validation_error",
            "units[2]",
            2,
        ),
        ({"unit": "u-1", "experiments": ["ranker-v2", 7]}, "validation_error", "experiments[1]", 1),
        ({"unit": "u-1", "experiments": None}, "validation_error", "experiments", None),
        (
            {"unit": "u-1", "experiments": ["ranker-v2", "nope"]},
            "experiment_not_found",
            "experiments[1]",
            1,
        ),
        ({"experiment": "nope", "units": ["u-1"]}, "experiment_not_found", "experiment", None),
        (
            {"experiment": "ranker-v2", "units": ["u-1"], "unit": "u"},
            "validation_error",
            "units",
            None,
        ),
        ({"experiment": "ranker-v2", "units": ["u-1"], "extra": 1}, "unknown_field", "extra", None),
    ],
)
def test_a_bad_batch_is_refused_whole_and_records_nothing(
    edge: tuple[Edge, Client, str], body: dict[str, Any], code: str, field: str, index: int | None
) -> None:
    app, client, key = edge
    response = client.request("POST", "/v1/decide/batch", json=body, headers=_auth(key))
    assert_problem(
        response, 400 if code != "experiment_not_found" else 404, code, field, index=index
    )
    app.context.exposures.flush_now()
    assert not Exposure.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_batch_lists_every_bad_unit(edge: tuple[Edge, Client, str]) -> None:
    _, client, key = edge
    units = ["u-0", "", "u-2", ["x"], "bad\udcff"]
    body = orjson.dumps({"experiment": "ranker-v2", "units": units[:4]})[:-2] + b',"bad\\udcff"]}'
    response = client.request("POST", "/v1/decide/batch", content=body, headers=_auth(key))
    problem = assert_problem(response, 400, "invalid_encoding", "units[4]")
    body = orjson.dumps({"experiment": "ranker-v2", "units": units[:4]})
    response = client.request("POST", "/v1/decide/batch", content=body, headers=_auth(key))
    problem = assert_problem(response, 400, "validation_error", "units[1]", index=1)
    assert [(e["index"], e["field"]) for e in problem["errors"]] == [
        (1, "units[1]"),
        (3, "units[3]"),
    ]


@pytest.mark.django_db(transaction=True)
def test_an_experiment_created_after_the_snapshot_is_served_not_refused(
    edge: tuple[Edge, Client, str],
) -> None:
    app, client, key = edge
    version = app.context.snapshots.current.version
    create_experiment("fresh", "ab")
    services.experiment_start(actor="test", key="fresh")
    # The snapshot lags (no refresh ran): the miss confirms the version and loads the new one.
    fresh = client.request("GET", "/v1/decide?experiment=fresh&unit=u-1", headers=_auth(key))
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["reason"] == "assigned"
    assert app.context.snapshots.current.version > version
    # A key the confirmed snapshot still lacks does not exist.
    missing = client.request("GET", "/v1/decide?experiment=nope&unit=u-1", headers=_auth(key))
    assert_problem(missing, 404, "experiment_not_found", "experiment")


@pytest.mark.django_db(transaction=True)
def test_one_version_check_serves_every_new_key_of_a_batch(edge: tuple[Edge, Client, str]) -> None:
    app, client, key = edge
    holder = app.context.snapshots
    reads: list[int] = []
    read_version = holder._version_reader

    def counted() -> int:
        reads.append(1)
        return read_version()

    holder._version_reader = counted
    fresh = [f"fresh-{number}" for number in range(3)]
    for name in fresh:
        create_experiment(name, "ab")
    response = client.request(
        "POST", "/v1/decide/batch", json={"unit": "u-1", "experiments": fresh}, headers=_auth(key)
    )
    assert response.status_code == 200, response.text
    assert [d["experiment"] for d in response.json()["decisions"]] == fresh
    assert len(reads) == 1


@pytest.mark.django_db(transaction=True)
def test_an_unknown_experiment_is_not_on_edge_while_the_version_cannot_be_confirmed(
    edge: tuple[Edge, Client, str],
) -> None:
    app, client, key = edge
    holder = app.context.snapshots

    def database_down() -> int:
        raise OperationalError("connection refused")

    holder._version_reader = database_down
    response = client.request("GET", "/v1/decide?experiment=fresh&unit=u-1", headers=_auth(key))
    problem = assert_problem(response, 503, "experiment_not_on_edge", "experiment")
    assert response.headers["retry-after"] == "60" and problem["retry_after_s"] == 60
    # Known experiments are still served from the snapshot meanwhile.
    known = client.request("GET", "/v1/decide?experiment=ranker-v2&unit=u-1", headers=_auth(key))
    assert known.status_code == 200


@pytest.mark.django_db(transaction=True)
def test_unexpected_failures_are_a_problem_500(
    edge: tuple[Edge, Client, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client, key = edge

    def broken(**_: Any) -> bool:
        raise RuntimeError("recorder broke")

    monkeypatch.setattr(app.context.exposures, "record", broken)
    response = client.request("GET", "/v1/decide?experiment=ranker-v2&unit=u-1", headers=_auth(key))
    assert_problem(response, 500, "server_error")
    assert "recorder broke" not in response.text


@pytest.mark.django_db(transaction=True)
def test_wrong_methods_name_the_allowed_ones(edge: tuple[Edge, Client, str]) -> None:
    _, client, key = edge
    for path, allowed in [
        ("/v1/decide", "GET, POST"),
        ("/v1/decide/batch", "POST"),
        ("/v1/config", "GET"),
    ]:
        response = client.request("DELETE", path, headers=_auth(key))
        assert_problem(response, 405, "method_not_allowed")
        assert response.headers["allow"] == allowed


@pytest.mark.django_db(transaction=True)
def test_config_has_an_etag_and_answers_304(edge: tuple[Edge, Client, str]) -> None:
    app, client, key = edge
    first = client.request("GET", "/v1/config", headers=_auth(key))
    assert first.status_code == 200
    etag = first.headers["etag"]
    document = first.json()
    assert document["format"] == 1
    [experiment] = document["experiments"]
    assert experiment["key"] == "ranker-v2" and experiment["status"] == "running"
    assert experiment["seed"] == "ranker-v2" and experiment["hash_version"] == 2
    assert [(v["key"], v["weight"], v["ranges"]) for v in experiment["variants"]] == [
        ("v1", 0.5, [[0.0, 0.5]]),
        ("v2", 0.5, [[0.5, 1.0]]),
    ]
    unchanged = client.request("GET", "/v1/config", headers={**_auth(key), "If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b""
    services.experiment_update(actor="test", key="ranker-v2", weights={"v1": 0.8, "v2": 0.2})
    app.context.snapshots.check_now()
    changed = client.request("GET", "/v1/config", headers={**_auth(key), "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert [v["weight"] for v in changed.json()["experiments"][0]["variants"]] == [0.8, 0.2]
    assert client.request("GET", "/v1/config").status_code == 401


@pytest.mark.django_db(transaction=True)
def test_mounts_and_fallback_get_their_paths(edge: tuple[Edge, Client, str]) -> None:
    app, client, _ = edge
    assert client.request("GET", "/proxy/ranker-v2/predict").json() == {"mounted": True}
    assert client.request("GET", "/admin/login/").json() == {"fallback": "/admin/login/"}
    # A path that only shares the prefix's letters is not the mount's.
    assert client.request("GET", "/proxyish").json() == {"fallback": "/proxyish"}
    mounted = app.mounts["/proxy/"]
    assert isinstance(mounted, Recording)
    assert mounted.paths == ["/proxy/ranker-v2/predict"]
    assert mounted.context is app.context


def test_not_ready_before_the_first_snapshot() -> None:
    context = EdgeContext(
        snapshots=SnapshotHolder(refresh_s=60),
        exposures=ExposureRecorder(flush_s=60),
        require_key=False,
    )
    client = Client(build_edge(context=context))
    response = client.request("GET", "/v1/decide?experiment=a&unit=b")
    assert_problem(response, 503, "not_ready")
    assert response.headers["retry-after"] == "1"


@pytest.mark.django_db(transaction=True)
def test_lifespan_starts_and_stops_everything_in_order(metrics: Any) -> None:
    create_experiment("ranker-v2", "ab")
    services.experiment_start(actor="test", key="ranker-v2")
    context = EdgeContext(
        snapshots=SnapshotHolder(refresh_s=0.05),
        exposures=ExposureRecorder(flush_s=60),
        require_key=False,
    )
    app = build_edge(mounts={"/proxy/": Recording}, context=context)
    mounted = app.mounts["/proxy/"]
    assert isinstance(mounted, Recording)

    async def run() -> list[dict[str, Any]]:
        incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(dict(message))

        task = asyncio.create_task(app({"type": "lifespan"}, incoming.get, send))
        await incoming.put({"type": "lifespan.startup"})
        while not sent:
            await asyncio.sleep(0.01)
        route = context.snapshots.current.route("ranker-v2")
        assert route is not None
        context.exposures.record(
            experiment_id=route.experiment_id, unit_id="late", variant_key="v1"
        )
        await incoming.put({"type": "lifespan.shutdown"})
        await task
        return sent

    sent = asyncio.run(run())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert mounted.events == ["startup", "shutdown"]
    # The exposure buffered just before shutdown was flushed by it.
    assert context.exposures.stats.buffered == 0
    assert Exposure.objects.filter(unit_id="late").count() == 1
