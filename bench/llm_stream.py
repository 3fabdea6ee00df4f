"""Streamed LLM answers through Rampart's proxy against the same stream called directly.

One OpenAI-compatible stand-in (``scripts.llm_server``: uvicorn, one worker, uvloop) streams
chat completions as server-sent events. The same requests go two ways, in alternating rounds:

* direct: to the stand-in itself (the baseline);
* rampart: through one edge worker (``config.asgi:application`` served as docker-compose.yml
  serves it) at ``/proxy/bench-llm/v1/chat/completions``, for a running A/B test whose two
  variants both point at the stand-in, with the unit in the OpenAI ``user`` field and token
  prices set, so the proxy measures TTFB, TTFT, chunks, tokens and cost as in production.

Two measurements:

* added TTFT: one connection, sequential streamed requests (TTFT 5 ms, 16 tokens); the
  client's time to the first event with content, direct and proxied; the p50 difference is
  what the proxy adds to the first token (target at most 1 ms);
* chunks per second: ``--streams`` concurrent streams of many fast tokens (no delay between
  them) for ``--duration`` seconds; content events received per second, and the edge's CPU
  time per chunk. The client and the stand-in are Python too and share the two cores, so the
  direct figure is the ceiling of this setup, not of the proxy.

Run: .venv/bin/python -m bench.llm_stream [--requests 300] [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import orjson

from bench.proxy import UVICORN_FLAGS, cpu_seconds, free_port, running

TARGET_ADDED_TTFT_MS = 1.0


def prepare_database(env: dict[str, str], upstream: str) -> str:
    """Migrate the throwaway database and start an A/B test on ``upstream``; returns a key."""
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    from experiments import services

    call_command("migrate", verbosity=0)
    services.experiment_create(
        actor="bench",
        key="bench-llm",
        name="Streaming benchmark",
        kind="ab",
        unit_source="json_field",
        unit_attribute="user",
        variants=[
            services.VariantInput(
                key=key,
                upstream_url=upstream,
                weight=0.5,
                is_control=key == "v1",
                price_input_per_m=1.0,
                price_output_per_m=2.0,
            )
            for key in ("v1", "v2")
        ],
    )
    services.experiment_start(actor="bench", key="bench-llm")
    _, raw_key = services.api_key_create(actor="bench", name="bench", scopes=["decide"])
    return raw_key


def body(user: str, tokens: int) -> bytes:
    return orjson.dumps(
        {
            "model": "bench",
            "user": user,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "stream something"}],
        }
    )


async def one_stream(
    session: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str]
) -> tuple[float, int]:
    """(time to the first content event in ms, content events) of one streamed answer."""
    started = time.perf_counter()
    first = 0.0
    events = 0
    async with session.post(url, data=data, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        async for line in response.content:
            if b'"content":"' in line and b'"content":""' not in line:
                if not events:
                    first = (time.perf_counter() - started) * 1000.0
                events += 1
    return first, events


async def ttft_run(url: str, headers: dict[str, str], requests: int) -> list[float]:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        samples = []
        for i in range(requests):
            first, _ = await one_stream(session, url, body(f"u{i % 100}", 16), headers)
            samples.append(first)
        return samples


async def chunk_run(
    url: str, headers: dict[str, str], streams: int, duration_s: float, tokens: int
) -> int:
    connector = aiohttp.TCPConnector(limit=streams)
    deadline = time.monotonic() + duration_s
    received = 0

    async def loop(index: int) -> None:
        nonlocal received
        n = 0
        while time.monotonic() < deadline:
            _, events = await one_stream(session, url, body(f"s{index}-{n}", tokens), headers)
            received += events
            n += 1

    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(loop(i) for i in range(streams)))
    return received


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="sequential TTFT samples")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per chunk run")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per chunk-run answer")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rampart-llm-bench-") as tmp, ExitStack() as servers:
        workdir = Path(tmp)
        model_port, edge_port = free_port(), free_port()
        model_url = f"http://127.0.0.1:{model_port}"
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.production",
            "DJANGO_SECRET_KEY": "bench-only",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DATABASE_URL": f"sqlite:///{workdir / 'bench.sqlite3'}",
            "RAMPART_DATA_DIR": str(workdir),
            "LOG_LEVEL": "WARNING",
        }
        key = prepare_database(env, model_url)
        print(f"load average before the run: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
        model = [
            *(sys.executable, "-m", "scripts.llm_server", "--name", "bench"),
            *("--port", str(model_port), "--ttft-ms", "5", "--tokens-per-s", "1000000"),
            *("--output-tokens", "100000"),
        ]
        servers.enter_context(running(model, env=env, log=workdir / "model.log", url=model_url))
        edge_command = [
            *(sys.executable, "-m", "uvicorn", "config.asgi:application"),
            *("--port", str(edge_port), "--lifespan", "on", *UVICORN_FLAGS),
        ]
        edge_url = f"http://127.0.0.1:{edge_port}"
        edge = servers.enter_context(
            running(edge_command, env=env, log=workdir / "edge.log", url=edge_url)
        )
        targets = {
            "direct": (f"{model_url}/v1/chat/completions", {}),
            "rampart": (
                f"{edge_url}/proxy/bench-llm/v1/chat/completions",
                {"X-Rampart-Key": key},
            ),
        }
        for url, headers in targets.values():  # warm up both paths
            asyncio.run(ttft_run(url, headers, 20))
        p50: dict[str, list[float]] = {name: [] for name in targets}
        rates: dict[str, list[float]] = {name: [] for name in targets}
        cpu_per_chunk: list[float] = []
        for round_number in range(1, args.rounds + 1):
            for name, (url, headers) in targets.items():
                samples = asyncio.run(ttft_run(url, headers, args.requests))
                p50[name].append(statistics.median(samples))
                before = cpu_seconds(edge.pid)
                started = time.perf_counter()
                chunks = asyncio.run(
                    chunk_run(url, headers, args.streams, args.duration, args.tokens)
                )
                elapsed = time.perf_counter() - started
                rates[name].append(chunks / elapsed)
                line = (
                    f"round {round_number} {name:8s} TTFT p50 {p50[name][-1]:6.2f} ms "
                    f"(p99 {statistics.quantiles(samples, n=100)[98]:6.2f})  "
                    f"{rates[name][-1]:9,.0f} chunks/s"
                )
                if name == "rampart":
                    cpu = (cpu_seconds(edge.pid) - before) / max(chunks, 1) * 1e6
                    cpu_per_chunk.append(cpu)
                    line += f"  edge CPU {cpu:.1f} µs per chunk"
                print(line, flush=True)
        added = [r - d for r, d in zip(p50["rampart"], p50["direct"], strict=True)]
        print(
            "\nadded TTFT at p50 (proxy - direct, per round): "
            + ", ".join(f"{a:+.2f} ms" for a in added)
            + f"; median {statistics.median(added):+.2f} ms (target <= {TARGET_ADDED_TTFT_MS} ms)"
        )
        print(
            f"chunks/s through one edge worker: best {max(rates['rampart']):,.0f}, median "
            f"{statistics.median(rates['rampart']):,.0f} (direct: best "
            f"{max(rates['direct']):,.0f}, ratio of bests "
            f"{max(rates['rampart']) / max(rates['direct']):.2f}x); edge CPU per chunk median "
            f"{statistics.median(cpu_per_chunk):.1f} µs"
        )
        return 0 if statistics.median(added) <= TARGET_ADDED_TTFT_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
