"""Events per second through POST /v1/events against raw psycopg COPY into the same table.

Both sides write the same kind of rows (fresh event ids, 1,000 events per batch, one
transaction per batch) into ``routing_event`` of a throwaway PostgreSQL database that this
script creates on the server named by DATABASE_URL, migrates and drops again.

  * API: the edge with the events API mounted, under uvicorn with one worker, driven by
    ``--clients`` concurrent httpx clients that post pre-serialised JSON bodies (so the
    client's own encoding is not timed). The edge authenticates the key, parses and
    validates every event, COPYs the batch into a staging table and inserts it with
    ON CONFLICT DO NOTHING, and answers with exact accepted/duplicate counts.
  * Baseline: one psycopg connection that COPYs the same number of prepared rows straight
    into the table, one COPY and one transaction per batch.

Passes alternate between the two so that load from other processes slows both; each side
reports its best pass. Target: the API at least 0.5x the baseline.

Run (PostgreSQL from scripts/services.sh):
    scripts/services.sh start && eval "$(scripts/services.sh env)"
    .venv/bin/python -m bench.ingest [--batches 200] [--batch-size 1000] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import psycopg

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.5
PASSES = 3
EVENT_NAMES = ("purchase", "add_to_cart", "click", "revenue", "signup")
UVICORN_FLAGS = [
    "--factory",
    "--host",
    "127.0.0.1",
    "--workers",
    "1",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--log-level",
    "warning",
    "--lifespan",
    "on",
]

Row = tuple[str, str, str, float, datetime]


def edge_app() -> Any:
    """The edge with the events API mounted (served by uvicorn's --factory)."""
    import django

    # Django must be set up before the edge modules import models.
    django.setup()
    from routing.edge.app import build_edge
    from routing.edge.ingest import EventsApp

    return build_edge(mounts={"/v1/events": EventsApp})


@dataclass(frozen=True)
class Batch:
    rows: list[Row]
    body: bytes


def make_batches(label: str, count: int, size: int, seed: int) -> list[Batch]:
    """``count`` batches of ``size`` events with ids unique to ``label``."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    batches = []
    for number in range(count):
        rows: list[Row] = []
        events = []
        for position in range(size):
            event_id = f"{label}-{number}-{position}-{uuid.UUID(int=rng.getrandbits(128)).hex}"
            unit_id = f"user-{rng.randrange(1_000_000)}"
            name = EVENT_NAMES[rng.randrange(len(EVENT_NAMES))]
            value = round(rng.uniform(0.5, 200.0), 2)
            timestamp = start + timedelta(seconds=rng.randrange(86_400 * 30))
            rows.append((event_id, unit_id, name, value, timestamp))
            events.append(
                {
                    "event_id": event_id,
                    "unit_id": unit_id,
                    "name": name,
                    "value": value,
                    "timestamp": timestamp.isoformat().replace("+00:00", "Z"),
                }
            )
        batches.append(Batch(rows=rows, body=orjson.dumps({"events": events})))
    return batches


def copy_pass(database_url: str, batches: list[Batch]) -> float:
    """Seconds to COPY every batch straight into routing_event, one transaction each."""
    received_at = datetime.now(UTC)
    with psycopg.connect(database_url) as conn:
        started = time.perf_counter()
        for batch in batches:
            with (
                conn.transaction(),
                conn.cursor() as cursor,
                cursor.copy(
                    "COPY routing_event (event_id, unit_id, name, value, timestamp, received_at) "
                    "FROM STDIN"
                ) as copy,
            ):
                for row in batch.rows:
                    copy.write_row((*row, received_at))
        return time.perf_counter() - started


async def api_pass(url: str, key: str, batches: list[Batch], clients: int) -> float:
    """Seconds to post every batch with ``clients`` concurrent clients; checks the counts."""
    queue: asyncio.Queue[Batch] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    accepted = 0
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal accepted
        while not queue.empty():
            batch = queue.get_nowait()
            response = await http.post("/v1/events", content=batch.body, headers=headers)
            response.raise_for_status()
            counts = response.json()
            if counts["duplicates"]:
                raise RuntimeError(f"unexpected duplicates: {counts}")
            accepted += counts["accepted"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    expected = sum(len(batch.rows) for batch in batches)
    if accepted != expected:
        raise RuntimeError(f"the API accepted {accepted} of {expected} events")
    return elapsed


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[str]:
    """Run the events edge under uvicorn on a free port until the block ends."""
    port = _free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.ingest:edge_app",
                "--port",
                str(port),
                *UVICORN_FLAGS,
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/events", timeout=1.0)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the edge did not start; see {log}") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``server_url``; dropped afterwards."""
    name = f"rampart_bench_ingest_{os.getpid()}"
    parts = urlsplit(server_url)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def prepare(env: dict[str, str]) -> str:
    """Migrate the throwaway database and create a key with the ingest scope."""
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections

    from experiments import services

    call_command("migrate", verbosity=0)
    _, raw_key = services.api_key_create(actor="bench", name="bench", scopes=["ingest"])
    connections.close_all()
    return raw_key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="batches per pass")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent API clients")
    args = parser.parse_args()
    server_url = os.environ.get("DATABASE_URL", "")
    if not server_url.startswith(("postgres://", "postgresql://")):
        print("DATABASE_URL must name a PostgreSQL server (scripts/services.sh env)")
        return 2

    logs = ROOT / "var" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    with throwaway_database(server_url) as database_url:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.production",
            "DJANGO_SECRET_KEY": "bench-only",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DATABASE_URL": database_url,
            "LOG_LEVEL": "WARNING",
        }
        key = prepare(env)
        events_per_pass = args.batches * args.batch_size
        api_times: list[float] = []
        copy_times: list[float] = []
        with serve(env, logs / "ingest-edge.log") as url:
            warm_up = make_batches("warm", 4, args.batch_size, seed=0)
            asyncio.run(api_pass(url, key, warm_up, args.clients))
            for number in range(PASSES):
                api_batches = make_batches(f"api{number}", args.batches, args.batch_size, number)
                api_times.append(asyncio.run(api_pass(url, key, api_batches, args.clients)))
                copy_batches = make_batches(
                    f"copy{number}", args.batches, args.batch_size, 100 + number
                )
                copy_times.append(copy_pass(database_url, copy_batches))
        with psycopg.connect(database_url) as conn:
            stored = conn.execute("SELECT count(*) FROM routing_event").fetchone()
        from django.db import connections

        connections.close_all()

    api_rate = events_per_pass / min(api_times)
    copy_rate = events_per_pass / min(copy_times)
    ratio = api_rate / copy_rate
    print(
        f"{events_per_pass:,} events per pass in batches of {args.batch_size:,}, "
        f"best of {PASSES} alternating passes; PostgreSQL {server_url.rsplit('@', 1)[-1]}"
    )
    print(
        f"  API  (uvicorn, 1 worker, {args.clients} httpx clients): {api_rate:>10,.0f} events/s"
        f"   passes: {', '.join(f'{events_per_pass / t:,.0f}' for t in api_times)}"
    )
    print(
        f"  COPY (psycopg, 1 connection):              {copy_rate:>10,.0f} events/s"
        f"   passes: {', '.join(f'{events_per_pass / t:,.0f}' for t in copy_times)}"
    )
    print(f"  rows stored: {stored[0] if stored else 0:,}")
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(f"  ratio API/COPY: {ratio:.2f}x, {verdict} the {TARGET_RATIO}x target")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
