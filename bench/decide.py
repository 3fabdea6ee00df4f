"""Throughput and latency of the edge's /v1/decide against a bare ASGI app on the same server.

Both apps run under uvicorn with one worker and the same flags; wrk drives each with the
same Lua script (16 connections): every request carries an API key and a different unit id,
so the edge checks the key, hashes the unit and buffers a first exposure on every request,
with its recorder flushing to SQLite in the background. The bare app returns a fixed JSON
body. The edge serves a running A/B experiment from a throwaway SQLite database under
var/bench/, created, migrated and deleted by this script.

Target: at least 0.5x the bare app's requests per second, and p99 under 5 ms.

The apps are measured in alternating rounds and the best round of each is compared:
load from other processes only ever slows a run down. Every round is printed.

Run: .venv/bin/python bench/decide.py [--duration 10] [--connections 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "var" / "bench"
TARGET_RATIO = 0.5
TARGET_P99_MS = 5.0
UVICORN_FLAGS = [
    "--host",
    "127.0.0.1",
    "--workers",
    "1",
    "--loop",
    "uvloop",
    "--http",
    "routing.edge.server:EdgeHttpProtocol",
    "--no-access-log",
    "--log-level",
    "warning",
    "--lifespan",
    "on",
]
WRK_SCRIPT = """
local counter = 0
local key = "{key}"
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/decide?experiment=bench-ab&unit={run}-" .. counter, {{
    ["Authorization"] = "Bearer " .. key,
  }})
end
"""
APPS = {"bare": "bench.decide:bare_app", "edge": "config.asgi:application"}
BARE_BODY = (
    b'{"experiment":"bench-ab","unit":"user-1","variant":"v1","in_experiment":true,'
    b'"reason":"assigned","upstream":"http://127.0.0.1:9001"}'
)


async def bare_app(
    scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
) -> None:
    """The baseline: the smallest ASGI app that answers with a decision-sized JSON body."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(BARE_BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": BARE_BODY})


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: str
    # CPU time the server process spent per request: unlike throughput, barely moved by
    # other load on the machine, so it is the steadier basis for comparing the two apps.
    server_cpu_us: float


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), utime and stime, counted from the state field (3).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(server: Server, script: Path, *, duration_s: int, connections: int) -> WrkResult:
    cpu_before = _cpu_seconds(server.pid)
    output = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration_s}s",
            "--latency",
            "-s",
            str(script),
            server.url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    cpu_s = _cpu_seconds(server.pid) - cpu_before
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, flags=re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", output)
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    return WrkResult(
        requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        p50_ms=_ms(latency["50"]),
        p99_ms=_ms(latency["99"]),
        requests=requests,
        errors=errors.group(0) if errors else "",
        server_cpu_us=cpu_s / max(requests, 1) * 1e6,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: str, env: dict[str, str], log: Path) -> Iterator[Server]:
    """Run ``app`` under uvicorn on a free port until the block ends."""
    port = _free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--port", str(port), *UVICORN_FLAGS],
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
                httpx.get(url + "/", timeout=1.0)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{app} did not start; see {log}") from None
                time.sleep(0.05)
        yield Server(url=url, pid=process.pid)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prepare_database(env: dict[str, str]) -> tuple[str, int]:
    """Migrate the throwaway database, create and start the experiment; (key, experiment id)."""
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    from experiments import services

    call_command("migrate", verbosity=0)
    experiment = services.experiment_create(
        actor="bench",
        key="bench-ab",
        name="Decide benchmark",
        kind="ab",
        variants=[
            services.VariantInput(
                key="v1", upstream_url="http://127.0.0.1:9001", weight=0.5, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url="http://127.0.0.1:9002", weight=0.5),
        ],
    )
    services.experiment_start(actor="bench", key="bench-ab")
    _, raw_key = services.api_key_create(actor="bench", name="bench", scopes=["decide"])
    return raw_key, int(experiment.pk)


def exposures_written(experiment_id: int) -> int:
    from django.db import connections

    from routing.selectors import exposure_counts

    connections.close_all()
    return sum(exposure_counts(experiment_id).values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each app")
    args = parser.parse_args()

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="decide-", dir=BENCH_DIR))
    try:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.production",
            "DJANGO_SECRET_KEY": "bench-only",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DATABASE_URL": f"sqlite:///{workdir / 'bench.sqlite3'}",
            "RAMPART_DATA_DIR": str(workdir),
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
        }
        key, experiment_id = prepare_database(env)
        print(f"load average before the run: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
        rounds: list[dict[str, WrkResult]] = []
        with ExitStack() as servers:
            running = {
                label: servers.enter_context(serve(app, env, workdir / f"{label}.log"))
                for label, app in APPS.items()
            }
            check = httpx.get(
                f"{running['edge'].url}/v1/decide",
                params={"experiment": "bench-ab", "unit": "warm-up"},
                headers={"Authorization": f"Bearer {key}"},
            )
            check.raise_for_status()
            for round_index in range(args.rounds):
                results = {}
                for label, server in running.items():
                    # Fresh unit ids in every run, so no run finds its units already cached.
                    script = workdir / f"{label}-{round_index}.lua"
                    script.write_text(WRK_SCRIPT.format(key=key, run=f"{label}{round_index}"))
                    if round_index == 0:
                        run_wrk(server, script, duration_s=2, connections=args.connections)
                    results[label] = run_wrk(
                        server, script, duration_s=args.duration, connections=args.connections
                    )
                rounds.append(results)
        written = exposures_written(experiment_id)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    flags = " ".join(UVICORN_FLAGS)
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s; uvicorn {flags}")
    for round_index, results in enumerate(rounds):
        for label, result in results.items():
            errors = f", {result.errors}" if result.errors else ""
            print(
                f"  round {round_index + 1} {label:4s} {result.requests_per_s:8.0f} req/s  "
                f"p50 {result.p50_ms:5.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                f"server CPU {result.server_cpu_us:5.1f} us/request  "
                f"({result.requests} requests{errors})"
            )
    # Other load on the machine only ever slows a run down, so the best round of each app
    # is the least disturbed measurement of it.
    bare = max((r["bare"] for r in rounds), key=lambda r: r.requests_per_s)
    edge = max((r["edge"] for r in rounds), key=lambda r: r.requests_per_s)
    ratio = edge.requests_per_s / bare.requests_per_s
    cpu_ratio = min(r["bare"].server_cpu_us for r in rounds) / min(
        r["edge"].server_cpu_us for r in rounds
    )
    print(f"  exposures written by the edge: {written} distinct units")
    print(f"  server CPU per request, bare/edge (lowest of the rounds): {cpu_ratio:.2f}")
    print(
        f"  best rounds: bare {bare.requests_per_s:.0f} req/s (p99 {bare.p99_ms:.2f} ms), "
        f"edge {edge.requests_per_s:.0f} req/s (p50 {edge.p50_ms:.2f} ms, p99 {edge.p99_ms:.2f} ms)"
    )
    print(
        f"  ratio edge/bare: {ratio:.2f}x (target >= {TARGET_RATIO}x); "
        f"edge p99 {edge.p99_ms:.2f} ms (target < {TARGET_P99_MS} ms)"
    )
    ok = ratio >= TARGET_RATIO and edge.p99_ms < TARGET_P99_MS and not edge.errors
    print("  PASS" if ok else "  FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
