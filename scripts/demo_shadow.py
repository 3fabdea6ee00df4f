"""`make demo ARGS="--scenario shadow"`: two shadows of a classifier get paired verdicts.

The platform runs as in the other scenarios (``scripts.demo``: edge and web app, Celery worker
and beat, a Slack stand-in, all on loopback). Production is one classifier, v1, taking every
request of experiment ``ranker-shadow``. Two candidate versions run as shadows: each gets a
mirrored copy of every request, in the background, and its answer and latency are paired with
v1's on the same request (one pair per user: its first mirrored request):

* ``v2-fast`` answers exactly like v1, 10% faster: "ready to canary";
* ``v3-retrained`` is as fast as v1 but gives a different label on about 20% of requests:
  "worse than control", naming the disagreement's lower bound.

The stand-in models (``ShadowModel``, served by this module with ``--serve``) take their time
from the request's ``size`` (the same for all versions, as a real payload's size would be) times
a little noise of their own, so most of the latency variance is between requests: what pairing
removes. When both verdicts are in (each alerted once in Slack), the demo starts a canary from
the ready shadow through ``POST /api/v1/experiments/{key}/shadows/{shadow}/canary``, twice, to
show that the second click returns the same draft canary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from rich.console import Console

from scripts.demo import (
    BEAT_ARGS,
    LOGIN,
    ROOT,
    UVICORN_ARGS,
    WORKER_ARGS,
    DemoError,
    Processes,
    create_key,
    demo_env,
    free_port,
    manage,
    port_is_free,
    prepare_data_dir,
    setup_django,
    tail,
    wait_until_answers,
)
from scripts.demo_slack import SlackStandIn, render

EXPERIMENT = "ranker-shadow"
CONTROL, FAST, RETRAINED = "v1", "v2-fast", "v3-retrained"
# name: (median ms at size 1, share of requests answered with another label)
MODELS = {CONTROL: (40.0, 0.0), FAST: (36.0, 0.0), RETRAINED: (40.0, 0.2)}
EXPECTED = {FAST: "ready", RETRAINED: "worse"}
METRICS = (
    {
        "key": "latency-p95",
        "name": "p95 latency",
        "kind": "quantile",
        "source": "latency_ms",
        "quantile": 0.95,
        "direction": "lower",
    },
    {
        "key": "error-rate",
        "name": "Error rate",
        "kind": "binomial",
        "source": "error",
        "direction": "lower",
    },
)
NOISE_SIGMA = 0.05
SIZE_SIGMA = 0.3
SLACK_WAIT_S = 30.0
POLL_S = 1.0


class ShadowModel:
    """A classifier stand-in: label from the request's features, delay from its size."""

    def __init__(self, *, median_ms: float, disagree: float, seed: int) -> None:
        self.median_s = median_ms / 1000.0
        self.threshold = round(disagree * 10_000)
        self.random = random.Random(seed)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            request = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            request = {}
        size = float(request.get("size", 1.0)) if isinstance(request, dict) else 1.0
        noise = self.random.lognormvariate(0.0, NOISE_SIGMA)
        await asyncio.sleep(self.median_s * max(size, 0.01) * noise)
        digest = zlib.crc32(orjson.dumps(request.get("features") if request else None))
        label = "fraud" if digest % 2 else "legitimate"
        if digest // 2 % 10_000 < self.threshold:
            label = "legitimate" if label == "fraud" else "fraud"
        answer = orjson.dumps({"label": label})
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


def serve(port: int, name: str) -> None:
    median_ms, disagree = MODELS[name]
    model = ShadowModel(median_ms=median_ms, disagree=disagree, seed=port)
    uvicorn.run(
        model,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


@dataclass
class Options:
    port: int
    data_dir: Path
    rate: float
    interval: float
    timeout: float
    exit: bool
    summary: Path | None


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description="Watch two shadows get paired verdicts.")
    parser.add_argument("--scenario", choices=["shadow"], default="shadow")
    parser.add_argument("--exit", action="store_true", help="exit after the verdicts")
    parser.add_argument("--port", type=int, default=8000, help="UI and edge port (0: any)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "var" / "demo")
    parser.add_argument("--rate", type=float, default=60.0, help="visits per second")
    parser.add_argument("--interval", type=float, default=1.0, help="ANALYSIS_INTERVAL_S")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after (seconds)")
    parser.add_argument("--summary", type=Path, help="write a JSON summary here")
    args = parser.parse_args(argv)
    return Options(
        port=args.port or free_port(),
        data_dir=args.data_dir.resolve(),
        rate=args.rate,
        interval=args.interval,
        timeout=args.timeout,
        exit=args.exit,
        summary=args.summary,
    )


class Users:
    """Visitors through the proxy: a new user most of the time, sometimes one coming back."""

    def __init__(self, base: str, key: str, rate: float) -> None:
        self.base, self.key, self.rate = base, key, rate
        self.random = random.Random(7)
        self.known: list[tuple[str, float]] = []
        self.requests = self.failed = 0
        self.ids = itertools.count(1)

    def visitor(self) -> tuple[str, float]:
        if self.known and self.random.random() < 0.3:
            return self.random.choice(self.known)
        user = (f"user-{next(self.ids)}", self.random.lognormvariate(0.0, SIZE_SIGMA))
        self.known.append(user)
        return user

    async def run(self, stop: asyncio.Event) -> None:
        pace = 8 / self.rate
        async with httpx.AsyncClient(
            base_url=self.base, headers={"X-Rampart-Key": self.key}, timeout=10
        ) as client:

            async def loop() -> None:
                while not stop.is_set():
                    sent = time.monotonic()
                    user, habit = self.visitor()
                    size = habit * self.random.lognormvariate(0.0, SIZE_SIGMA)
                    features = [self.random.randint(0, 99) for _ in range(4)]
                    try:
                        answer = await client.post(
                            f"/proxy/{EXPERIMENT}/predict",
                            headers={"X-Rampart-Unit": user},
                            json={"size": round(size, 3), "features": features},
                        )
                        self.requests += 1
                        self.failed += answer.status_code != 200
                    except httpx.HTTPError:
                        self.failed += 1
                    await asyncio.sleep(max(0.0, pace - (time.monotonic() - sent)))

            await asyncio.gather(*(loop() for _ in range(8)))


def _percent(interval: dict[str, Any] | None, shift: float = 0.0) -> str:
    if not interval or interval.get("estimate") is None:
        return "–"

    def show(value: float | None) -> str:
        if value is None or not math.isfinite(value):
            return "∞"
        # Ratios (shift -1) read as changes, signed; shares as they are.
        return f"{(value + shift):+.1%}" if shift else f"{value:.1%}"

    lower, upper = show(interval.get("lower")), show(interval.get("upper"))
    return f"{show(interval['estimate'])} [{lower}, {upper}]"


class ShadowDemo:
    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.console = console
        self.base = f"http://127.0.0.1:{options.port}"
        self.slack = SlackStandIn()
        self.processes = Processes(options.data_dir / "logs", demo_env(options, ""))
        self.started_at = time.monotonic()
        self.verdicts: dict[str, dict[str, Any]] = {}
        self.decided_at: dict[str, float] = {}
        self.outcome: dict[str, Any] = {}

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.started_at:5.1f}s[/dim] {text}")

    def setup(self) -> tuple[str, str]:
        options = self.options
        if not port_is_free(options.port):
            raise DemoError(f"port {options.port} is in use; pass --port (0 picks a free one)")
        prepare_data_dir(options.data_dir)
        self.slack.start()
        env = demo_env(options, self.slack.url())
        self.processes = Processes(options.data_dir / "logs", env)
        setup_django(env)
        manage("migrate", "--noinput", "-v", "0")
        manage("createdemoadmin", "--username", LOGIN[0], "--password", LOGIN[1])
        traffic_key = create_key("demo-traffic", "decide,ingest")
        admin_key = create_key("demo-narrator", "read,manage")
        from django.db import connections

        connections.close_all()
        ports = {name: free_port() for name in MODELS}
        for name, port in ports.items():
            self.processes.start(
                f"model-{name}", ["-m", "scripts.demo_shadow", "--serve", name, "--port", str(port)]
            )
        self.processes.start("web-edge", [*UVICORN_ARGS, "--port", str(options.port)])
        self.processes.start("worker", WORKER_ARGS)
        self.processes.start(
            "beat", [*BEAT_ARGS, "--schedule", str(options.data_dir / "celerybeat-schedule")]
        )
        for port in ports.values():
            wait_until_answers(f"http://127.0.0.1:{port}/", self.processes)
        wait_until_answers(f"{self.base}/readyz", self.processes)
        for metric in METRICS:
            self.api("post", "/api/v1/metrics/", admin_key, json=metric)
        self.api("post", "/api/v1/experiments/", admin_key, json=self.definition(ports))
        self.api("post", f"/api/v1/experiments/{EXPERIMENT}/start/", admin_key)
        self.say(
            f"experiment {EXPERIMENT}: v1 takes every request; shadows {FAST} (same answers, "
            f"10% faster) and {RETRAINED} (as fast, another label on ~20% of requests) get "
            f"mirrored copies. Edge and UI on {self.base} (login {LOGIN[0]} / {LOGIN[1]})"
        )
        return traffic_key, admin_key

    @staticmethod
    def definition(ports: dict[str, int]) -> dict[str, Any]:
        control = f"http://127.0.0.1:{ports[CONTROL]}"
        return {
            "key": EXPERIMENT,
            "name": "Fraud classifier shadows",
            "kind": "ab",
            "shadow_compare_field": "label",
            "variants": [
                {"key": CONTROL, "upstream_url": control, "weight": 1.0, "is_control": True},
                # The A/B's second slot takes no traffic: production is v1 alone.
                {"key": "v1-slot", "upstream_url": control, "weight": 0.0},
                *(
                    {
                        "key": name,
                        "upstream_url": f"http://127.0.0.1:{ports[name]}",
                        "weight": 0.0,
                        "is_shadow": True,
                    }
                    for name in (FAST, RETRAINED)
                ),
            ],
            # The guardrails a canary started from a shadow takes over.
            "metrics": [
                {"metric": "latency-p95", "role": "guardrail", "margin": 0.1},
                {"metric": "error-rate", "role": "guardrail", "margin": 0.0},
            ],
        }

    def api(self, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
        response = httpx.request(
            method,
            f"{self.base}{path}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
            **kwargs,
        )
        if response.status_code >= 400:
            raise DemoError(f"{method.upper()} {path}: {response.status_code} {response.text}")
        return response

    def poll(self, admin_key: str) -> None:
        body = self.api("get", f"/api/v1/experiments/{EXPERIMENT}/results", admin_key).json()
        for shadow in body.get("shadows", []):
            name = shadow["variant"]
            latest = shadow.get("latest") or {}
            if shadow["verdict"] != "collecting" and name not in self.decided_at:
                self.decided_at[name] = time.monotonic() - self.started_at
                self.say(
                    f"[bold]{name}[/bold] after {latest.get('pairs', 0):,} users' pairs: "
                    f"{shadow['reason']}"
                )
                self.say(
                    f"  answers differ {_percent(latest.get('disagreement'))}, mean latency "
                    f"{_percent(latest.get('latency_ratio'), -1.0)}, paired p95 latency ratio "
                    f"{_percent(latest.get('p95_pair_ratio'), -1.0)} (always-valid intervals)"
                )
            self.verdicts[name] = shadow

    def print_slack(self) -> None:
        while not self.slack.inbox.empty():
            message = self.slack.inbox.get()
            channel = f"#alerts (stand-in on :{self.slack.port})"
            self.console.print(render(message, channel=channel))

    async def run(self, traffic_key: str, admin_key: str) -> None:
        users = Users(self.base, traffic_key, self.options.rate)
        stop = asyncio.Event()
        sender = asyncio.create_task(users.run(stop))
        deadline = time.monotonic() + self.options.timeout
        try:
            while set(self.decided_at) != set(EXPECTED):
                self.processes.check()
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"no verdicts within {self.options.timeout:.0f}s: {self.verdicts}\n"
                        + tail(self.options.data_dir / "logs" / "worker.log")
                    )
                await asyncio.sleep(POLL_S)
                await asyncio.to_thread(self.poll, admin_key)
                self.print_slack()
        finally:
            stop.set()
            await sender
        self.outcome["requests"] = users.requests
        self.outcome["failed_requests"] = users.failed
        self.outcome["users"] = len(users.known)

    def start_canary(self, admin_key: str) -> dict[str, Any]:
        path = f"/api/v1/experiments/{EXPERIMENT}/shadows/{FAST}/canary"
        first = self.api("post", path, admin_key)
        second = self.api("post", path, admin_key)
        canary = first.json()["experiment"]
        self.say(
            f"started a canary from {FAST}: draft experiment {canary['key']} "
            f"({', '.join(v['key'] for v in canary['variants'])}; ramp "
            f"{' → '.join(format(s['canary_share'], '.0%') for s in canary['ramp_steps'])}); "
            f"a second click answered {second.status_code} with the same experiment"
        )
        return {
            "key": canary["key"],
            "first_status": first.status_code,
            "second_status": second.status_code,
            "second_created": second.json()["created"],
            "variants": {v["key"]: v["upstream_url"] for v in canary["variants"]},
        }

    def conclude(self, admin_key: str) -> bool:
        canary = self.start_canary(admin_key)
        deadline = time.monotonic() + SLACK_WAIT_S
        while len(self.slack.received("shadow_verdict")) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            self.print_slack()
        self.print_slack()
        verdicts = {name: shadow["verdict"] for name, shadow in self.verdicts.items()}
        self.outcome.update(
            {
                "scenario": "shadow",
                "verdicts": verdicts,
                "reasons": {name: shadow["reason"] for name, shadow in self.verdicts.items()},
                "latest": {name: shadow["latest"] for name, shadow in self.verdicts.items()},
                "seconds_to_verdict": {k: round(v, 1) for k, v in self.decided_at.items()},
                "canary": canary,
                "slack_messages": [
                    {"kind": m.kind, "header": m.header, "text": m.payload.get("text", "")}
                    for m in self.slack.received()
                ],
            }
        )
        ok = verdicts == EXPECTED and canary["first_status"] == 201
        style = "bold green" if ok else "bold red"
        self.console.print(
            f"\nOutcome: {FAST} {verdicts.get(FAST)}, {RETRAINED} {verdicts.get(RETRAINED)}"
            f"{'' if ok else ' (NOT as expected)'}; canary {canary['key']} created once.",
            style=style,
        )
        return ok

    def stop(self) -> None:
        self.processes.stop_all()
        with contextlib.suppress(Exception):
            self.slack.stop()


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(list(sys.argv[1:] if argv is None else argv))
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.rule("Rampart demo: shadow verdicts")
    demo = ShadowDemo(options, console)
    try:
        traffic_key, admin_key = demo.setup()
        asyncio.run(demo.run(traffic_key, admin_key))
        ok = demo.conclude(admin_key)
        if options.summary is not None:
            options.summary.write_text(json.dumps(demo.outcome, indent=2))
        if options.exit:
            return 0 if ok else 1
        console.print(
            f"\nRampart keeps running: {demo.base}/experiments/{EXPERIMENT}/ "
            f"(login {LOGIN[0]} / {LOGIN[1]}). Press Ctrl-C to stop."
        )
        while True:
            demo.processes.check()
            time.sleep(1)
    except DemoError as error:
        console.print(f"[bold red]Demo failed:[/bold red] {error}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    if "--serve" in sys.argv:
        parser = argparse.ArgumentParser(description="Serve one shadow-demo model version.")
        parser.add_argument("--serve", choices=sorted(MODELS), required=True)
        parser.add_argument("--port", type=int, required=True)
        served = parser.parse_args()
        serve(served.port, served.serve)
    else:
        sys.exit(main())
