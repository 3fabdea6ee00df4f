"""`make demo`: run the whole platform locally and watch a canary get rolled back (or promoted).

What runs, all on loopback, with the embedded defaults (SQLite and kombu's filesystem broker
under the data directory, unless DATABASE_URL / CELERY_BROKER_URL say otherwise):

* the edge and the web app: one ``uvicorn config.asgi:application`` (UI, admin, REST API,
  /proxy/, /v1/events, /metrics, /readyz);
* a Celery worker and Celery beat (analysis every ``--interval`` seconds, rollback, ramp,
  alerts through the outbox);
* two model versions (``scripts.demo_models``): v1, the control, and v2, the canary: 40%
  slower at p95 in the ``bad`` scenario, 10% faster and converting better in ``healthy``; in
  ``llm``, two OpenAI-compatible stand-ins (``scripts.llm_server``): a small model (v1) and a
  large one (v2) that converts better but is slower to its first token and costs more;
* a Slack stand-in (``scripts.demo_slack``) that SLACK_WEBHOOK_URL points at;
* simulated users (``scripts.demo_traffic``) sending predictions through the proxy and
  purchases to the events API.

The ``quantized`` and ``degraded`` scenarios serve real models instead
(``scripts.onnx_models``: a scikit-learn digits classifier exported with skl2onnx, run by
onnxruntime): v1 is the fp32 network, v2 its int8 quantisation (``quantized``, promoted when
its accuracy stays within the 1-point margin) or a network trained on partly corrupted labels
(``degraded``, rolled back on the accuracy guardrail). Users send held-out digits; the true
digit reaches ``POST /v1/labels`` two seconds after each answer.

The platform runs unmodified; the demo only chooses settings (short ramp steps, a short
ANALYSIS_INTERVAL_S) and talks to the public APIs. Its story is read back from the
platform: the audit log, the analysis results, and what the Slack stand-in received.

``--exit`` stops after the decision (and exits 1 if the outcome is not the expected one);
without it everything keeps serving until Ctrl-C so the UI can be explored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from scripts.demo_slack import SlackStandIn, render
from scripts.demo_story import Narrator, percent
from scripts.demo_traffic import SimulatedUsers

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "ranker-canary"
CONTROL, CANARY = "v1", "v2"
LOGIN = ("admin", "rampart-demo")
MARKER = ".rampart-demo"
# Inference-like latencies, large enough that scheduling noise on a busy 2-core laptop (tens
# of milliseconds at the tail) stays small next to a 40% difference at p95.
V1_MEDIAN_MS = 150.0
# The llm scenario's stand-ins: median time to first token (ms) and output tokens per second.
LLM_TTFT_MS = {CONTROL: 150.0, CANARY: 240.0}
LLM_TOKENS_PER_S = {CONTROL: 300.0, CANARY: 120.0}
LLM_OUTPUT_TOKENS = 24
# After a decision: keep the users coming this long, to show where traffic goes now.
AFTER_DECISION_S = 4.0
SLACK_WAIT_S = 30.0
POLL_S = 1.0

# One uvicorn serves the edge and the web app; the worker runs one task at a time (solo pool)
# and skips the cluster chatter a single local worker does not need.
UVICORN_ARGS = (
    "-m",
    "uvicorn",
    "config.asgi:application",
    "--host",
    "127.0.0.1",
    "--no-access-log",
    "--http",
    "routing.edge.server:EdgeHttpProtocol",
)
WORKER_ARGS = (
    "-m",
    "celery",
    "-A",
    "config",
    "worker",
    "--pool=solo",
    "--loglevel=INFO",
    "--without-heartbeat",
    "--without-gossip",
    "--without-mingle",
)
BEAT_ARGS = ("-m", "celery", "-A", "config", "beat", "--loglevel=INFO")


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    canary_median_ms: float
    conversion: Mapping[str, float]
    expected_status: str
    # Real models (scripts.onnx_models) for v1 and v2, with quality tracking; None: the
    # simulated latency-only model servers of scripts.demo_models.
    models: tuple[str, str] | None = None
    # Generative models: streamed chat completions, TTFT and cost guardrails.
    llm: bool = False


SCENARIOS = {
    "bad": Scenario(
        name="bad",
        summary="v2 answers about 40% slower at p95 than v1 (guardrail: at most 10% worse)",
        canary_median_ms=V1_MEDIAN_MS * 1.4,
        conversion={CONTROL: 0.10, CANARY: 0.10},
        expected_status="rolled_back",
    ),
    "healthy": Scenario(
        name="healthy",
        summary="v2 is 20% faster than v1 and converts a little better",
        canary_median_ms=V1_MEDIAN_MS * 0.8,
        conversion={CONTROL: 0.10, CANARY: 0.12},
        expected_status="completed",
    ),
    "quantized": Scenario(
        name="quantized",
        summary="v2 is v1's digits classifier quantised to int8 (onnxruntime); accuracy may "
        "drop at most 1 point",
        canary_median_ms=0.0,
        conversion={CONTROL: 0.10, CANARY: 0.10},
        expected_status="completed",
        models=("fp32", "int8"),
    ),
    "degraded": Scenario(
        name="degraded",
        summary="v2 is a digits classifier trained on partly corrupted labels: as fast as v1, "
        "clearly less accurate",
        canary_median_ms=0.0,
        conversion={CONTROL: 0.10, CANARY: 0.10},
        expected_status="rolled_back",
        models=("fp32", "degraded"),
    ),
    "llm": Scenario(
        name="llm",
        summary=(
            "a large chat model (v2) converts better than the small one (v1) but is about 60% "
            "slower to its first token and costs 15 times as much per answer (guardrails: p95 "
            "TTFT at most 20% worse, cost per request at most 50% higher)"
        ),
        canary_median_ms=LLM_TTFT_MS[CANARY],
        conversion={CONTROL: 0.10, CANARY: 0.13},
        expected_status="rolled_back",
        llm=True,
    ),
}


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where to look."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def prepare_data_dir(path: Path) -> None:
    """Start from an empty data directory; never wipe one the demo did not create."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise DemoError(f"{path} is not empty and was not made by the demo; choose --data-dir")
        shutil.rmtree(path)
    (path / "logs").mkdir(parents=True, exist_ok=True)
    (path / "metrics").mkdir(exist_ok=True)
    (path / MARKER).write_text("created by scripts/demo.py; wiped at every demo run\n")


class Processes:
    """The demo's child processes: started in their own sessions, stopped in reverse order."""

    def __init__(self, logs: Path, env: Mapping[str, str]) -> None:
        self.logs = logs
        self.env = dict(env)
        self.children: list[tuple[str, subprocess.Popen[bytes], TextIO]] = []

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed in stop_all
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Ctrl-C goes to the demo only, which then stops the children in order.
            start_new_session=True,
        )
        self.children.append((name, process, log))
        return process

    def check(self) -> None:
        for name, process, _ in self.children:
            if process.poll() is not None:
                raise DemoError(
                    f"{name} exited with code {process.returncode}; see {self.logs / name}.log:\n"
                    + tail(self.logs / f"{name}.log")
                )

    def stop_all(self) -> None:
        for _, process, _ in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, log in reversed(self.children):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        self.children.clear()


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def manage(*args: str) -> str:
    """Run a management command in this process (set up by ``setup_django``); its output."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    output = io.StringIO()
    try:
        call_command(*args, stdout=output, stderr=output)
    except CommandError as error:
        raise DemoError(
            f"manage.py {' '.join(args)} failed: {error}\n{output.getvalue()}"
        ) from None
    return output.getvalue()


def setup_django(env: Mapping[str, str]) -> None:
    """Configure Django in this process with the demo's settings (one start-up, not five)."""
    for name, value in env.items():
        # The demo process itself records no metrics; only its children share the directory.
        if name != "PROMETHEUS_MULTIPROC_DIR":
            os.environ[name] = value
    import django

    django.setup()
    # httpx logs every request at INFO; the story is told by the narrator instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def wait_until_answers(url: str, processes: Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check()
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise DemoError(f"{url} did not answer within {timeout:.0f}s")


@dataclass
class Options:
    scenario: Scenario
    port: int
    data_dir: Path
    rate: float
    step_seconds: int
    step_exposures: int
    interval: float
    timeout: float
    exit: bool
    summary: Path | None


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description="Run Rampart locally and watch a canary.")
    # "shadow" is scripts.demo_shadow's story; main() hands it over before parsing.
    parser.add_argument("--scenario", choices=sorted([*SCENARIOS, "shadow"]), default="bad")
    parser.add_argument("--exit", action="store_true", help="exit after the decision")
    parser.add_argument("--port", type=int, default=8000, help="UI and edge port (0: any)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "var" / "demo")
    parser.add_argument("--rate", type=float, default=60.0, help="visits per second")
    parser.add_argument("--step-seconds", type=int, default=8, help="minimum ramp step length")
    parser.add_argument("--step-exposures", type=int, default=6, help="users per arm per step")
    parser.add_argument("--interval", type=float, default=1.0, help="ANALYSIS_INTERVAL_S")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after (seconds)")
    parser.add_argument("--summary", type=Path, help="write a JSON summary here")
    args = parser.parse_args(argv)
    return Options(
        scenario=SCENARIOS[args.scenario],
        port=args.port or free_port(),
        data_dir=args.data_dir.resolve(),
        rate=args.rate,
        step_seconds=args.step_seconds,
        step_exposures=args.step_exposures,
        interval=args.interval,
        timeout=args.timeout,
        exit=args.exit,
        summary=args.summary,
    )


def demo_env(options: Options, slack_url: str) -> dict[str, str]:
    """The environment of every Rampart process of the demo: ordinary settings only."""
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings.dev",
            "DJANGO_DEBUG": "false",
            "RAMPART_DATA_DIR": str(options.data_dir),
            "RAMPART_BASE_URL": f"http://127.0.0.1:{options.port}",
            "SLACK_WEBHOOK_URL": slack_url,
            "ANALYSIS_INTERVAL_S": str(options.interval),
            "SNAPSHOT_REFRESH_S": "0.5",
            "RECORDER_FLUSH_S": "0.5",
            "OBSERVATION_BUCKET_S": "1",
            "ALERT_BACKOFF_BASE_S": "0.5",
            "ALERT_BACKOFF_MAX_S": "2",
            "EDGE_REQUIRE_KEY": "true",
            # Edge, worker and beat share one directory, so the edge's /metrics also shows
            # the pipeline's counters (rollbacks, ramp steps, alert deliveries).
            "PROMETHEUS_MULTIPROC_DIR": str(options.data_dir / "metrics"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def create_key(name: str, scopes: str) -> str:
    output = manage("createapikey", "--name", name, "--scopes", scopes)
    return output.strip().splitlines()[-1]


class Demo:
    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.console = console
        self.base = f"http://127.0.0.1:{options.port}"
        self.slack = SlackStandIn()
        self.env = demo_env(options, "")
        self.processes = Processes(options.data_dir / "logs", self.env)
        self.started_at = time.monotonic()
        self.traffic: SimulatedUsers | None = None
        self.narrator: Narrator | None = None
        self.outcome: dict[str, Any] = {}
        self.models: Any = None
        # Per model version, the in-process per-prediction latency (onnx_models.measure_latency).
        self.model_latency: dict[str, dict[str, float]] = {}

    def step(self, text: str) -> None:
        self.console.print(f"[dim]•[/dim] {text}")

    def setup(self) -> tuple[str, str]:
        """Data directory, database, demo login and experiment, processes; (traffic, admin) keys."""
        options = self.options
        if not port_is_free(options.port):
            raise DemoError(f"port {options.port} is in use; pass --port (0 picks a free one)")
        prepare_data_dir(options.data_dir)
        self.slack.start()
        self.env = demo_env(options, self.slack.url())
        self.processes = Processes(options.data_dir / "logs", self.env)
        database = self.env.get("DATABASE_URL") or f"SQLite in {options.data_dir}"
        broker = self.env.get("CELERY_BROKER_URL") or "filesystem:// (no server)"
        self.step(f"database: {database}; broker: {broker}")
        setup_django(self.env)
        manage("migrate", "--noinput", "-v", "0")
        self.step("migrated the database")
        manage("createdemoadmin", "--username", LOGIN[0], "--password", LOGIN[1])
        self.step(f"demo login {LOGIN[0]} / {LOGIN[1]}")
        ports = {CONTROL: free_port(), CANARY: free_port()}
        scenario = options.scenario
        if scenario.models is not None:
            from scripts.onnx_models import build_models, measure_latency

            self.models = build_models()
            accuracy = self.models.accuracy
            self.model_latency = measure_latency(self.models, scenario.models)
            self.step(
                "models: digits classifier (scikit-learn MLP 2048x2048 → skl2onnx → "
                "onnxruntime), "
                + ", ".join(
                    f"{v} {accuracy[v]:.1%} held-out accuracy, "
                    f"p95 {self.model_latency[v]['p95_us']:.0f} µs per prediction in-process"
                    for v in scenario.models
                )
            )
        try:
            seeded = manage(
                "seeddemo",
                *(("--quality",) if scenario.models is not None else ()),
                "--key",
                EXPERIMENT,
                "--control-url",
                f"http://127.0.0.1:{ports[CONTROL]}",
                "--canary-url",
                f"http://127.0.0.1:{ports[CANARY]}",
                "--step-seconds",
                str(options.step_seconds),
                "--step-exposures",
                str(options.step_exposures),
                *(("--llm",) if options.scenario.llm else ()),
            )
        except DemoError as error:
            raise DemoError(f"could not create the demo experiment: {error}") from None
        if "Created demo experiment" not in seeded:
            raise DemoError(
                f"the database already holds an experiment {EXPERIMENT} (DATABASE_URL is "
                f"{self.env.get('DATABASE_URL')}); run the demo on an empty database, or unset "
                "DATABASE_URL to use the demo's own SQLite file"
            )
        traffic_key = create_key("demo-traffic", "decide,ingest")
        admin_key = create_key("demo-narrator", "read,manage")
        from django.db import connections

        # The children own the database from here on; this process only uses the APIs.
        connections.close_all()
        self.step(
            f"experiment {EXPERIMENT} (draft): guardrails p95 latency (10% margin) and error "
            f"rate; ramp 1% → 5% → 10% → 25% → 50% → 100%, steps of at least "
            f"{options.step_seconds}s and {options.step_exposures} users per arm"
        )
        if scenario.models is not None:
            for name, version in zip((CONTROL, CANARY), scenario.models, strict=True):
                self.processes.start(
                    f"model-{name}",
                    ["-m", "scripts.onnx_models", "--model", version, "--port", str(ports[name])],
                )
            self.step(
                f"model servers: v1 ({scenario.models[0]}) on :{ports[CONTROL]}, "
                f"v2 ({scenario.models[1]}) on :{ports[CANARY]}; accuracy guardrail (may fall at "
                "most 1%), labels sent 2 s after each answer"
            )
        if scenario.llm:
            self.start_llms(ports)
        for name, median in ((CONTROL, V1_MEDIAN_MS), (CANARY, scenario.canary_median_ms)):
            if scenario.models is not None or scenario.llm:
                break
            self.processes.start(
                f"model-{name}",
                [
                    "-m",
                    "scripts.demo_models",
                    "--name",
                    name,
                    "--port",
                    str(ports[name]),
                    "--median-ms",
                    str(median),
                    "--seed",
                    str(ports[name]),
                ],
            )
        if scenario.models is None and not scenario.llm:
            self.step(
                f"model servers: v1 (median {V1_MEDIAN_MS:g} ms) on :{ports[CONTROL]}, "
                f"v2 (median {scenario.canary_median_ms:g} ms) on :{ports[CANARY]}"
            )
        self.processes.start(
            "web-edge",
            [*UVICORN_ARGS, "--port", str(options.port)],
        )
        self.processes.start(
            "worker",
            WORKER_ARGS,
        )
        self.processes.start(
            "beat",
            [*BEAT_ARGS, "--schedule", str(options.data_dir / "celerybeat-schedule")],
        )
        for name in (CONTROL, CANARY):
            path = "/v1/models" if scenario.llm else "/"
            wait_until_answers(f"http://127.0.0.1:{ports[name]}{path}", self.processes)
        wait_until_answers(f"{self.base}/readyz", self.processes)
        self.check_edge(traffic_key)
        self.warm_up(admin_key)
        self.step(
            f"edge and web app on {self.base}, Celery worker and beat (analysis every "
            f"{options.interval:g}s), Slack stand-in on :{self.slack.port}; logs in "
            f"{options.data_dir / 'logs'}"
        )
        return traffic_key, admin_key

    def start_llms(self, ports: Mapping[str, int]) -> None:
        """The llm scenario's two OpenAI-compatible stand-ins (``scripts.llm_server``)."""
        for name in (CONTROL, CANARY):
            self.processes.start(
                f"model-{name}",
                [
                    *("-m", "scripts.llm_server", "--name", name, "--port", str(ports[name])),
                    *("--ttft-ms", str(LLM_TTFT_MS[name]), "--ttft-sigma", "0.25"),
                    *("--tokens-per-s", str(LLM_TOKENS_PER_S[name])),
                    *("--output-tokens", str(LLM_OUTPUT_TOKENS), "--seed", str(ports[name])),
                ],
            )
        self.step(
            "LLM stand-ins (OpenAI-compatible, streaming): v1 small model (TTFT median "
            f"{LLM_TTFT_MS[CONTROL]:g} ms, {LLM_TOKENS_PER_S[CONTROL]:g} tokens/s) on "
            f":{ports[CONTROL]}, v2 large model (TTFT median {LLM_TTFT_MS[CANARY]:g} ms, "
            f"{LLM_TOKENS_PER_S[CANARY]:g} tokens/s) on :{ports[CANARY]}; prices per million "
            "tokens v1 $0.15 in / $0.60 out, v2 $2.50 / $10.00"
        )

    def check_edge(self, key: str) -> None:
        """Fail loudly when a part the story needs is not mounted on the edge."""
        headers = {"X-Rampart-Key": key}
        try:
            events = httpx.post(
                f"{self.base}/v1/events", json={"events": []}, headers=headers, timeout=30
            )
            if self.options.scenario.llm:
                proxied = httpx.get(
                    f"{self.base}/proxy/{EXPERIMENT}/v1/models", headers=headers, timeout=30
                )
            else:
                proxied = httpx.post(
                    f"{self.base}/proxy/{EXPERIMENT}/predict", headers=headers, timeout=30
                )
        except httpx.HTTPError as error:
            raise DemoError(f"the edge did not answer: {error!r}") from None
        if events.status_code == 404:
            raise DemoError("the events API (/v1/events) is not mounted on the edge")
        if proxied.status_code == 404 or "x-rampart-variant" not in proxied.headers:
            raise DemoError(f"the proxy did not serve {EXPERIMENT}: {proxied.text[:300]}")

    def warm_up(self, admin_key: str) -> None:
        """Read what the narrator will read, once, before the canary starts.

        The first request to each API view imports its modules in the process that also
        proxies; doing that now keeps the pause out of the canary's latency measurements.
        """
        headers = {"Authorization": f"Bearer {admin_key}"}
        path = f"{self.base}/api/v1/experiments/{EXPERIMENT}/"
        for url in (path, f"{path}audit/", f"{path}results/", f"{self.base}/metrics"):
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url, headers=headers, timeout=30)

    def start_experiment(self, admin_key: str) -> None:
        try:
            response = httpx.post(
                f"{self.base}/api/v1/experiments/{EXPERIMENT}/start/",
                headers={"Authorization": f"Bearer {admin_key}"},
                timeout=30,
            )
        except httpx.HTTPError as error:
            raise DemoError(f"the management API did not answer: {error!r}") from None
        if response.status_code != 200:
            raise DemoError(f"starting {EXPERIMENT} failed: {response.status_code} {response.text}")

    async def run_story(self, traffic_key: str, admin_key: str) -> None:
        options = self.options
        scenario = options.scenario
        self.traffic = SimulatedUsers(
            base_url=self.base,
            experiment=EXPERIMENT,
            api_key=traffic_key,
            rate=options.rate,
            conversion=scenario.conversion,
            control=CONTROL,
            digits=self.models.held_out() if self.models is not None else None,
            llm=scenario.llm,
        )
        self.narrator = Narrator(
            console=self.console,
            base_url=self.base,
            experiment=EXPERIMENT,
            api_key=admin_key,
            started_at=self.started_at,
        )
        stop_traffic = asyncio.Event()
        users = asyncio.create_task(self.traffic.run(stop_traffic))
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        deadline = time.monotonic() + options.timeout
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                with progress:
                    task = progress.add_task("starting", total=6, detail="")
                    self.start_experiment(admin_key)
                    after_decision: float | None = None
                    while True:
                        self.processes.check()
                        if users.done():
                            users.result()
                            raise DemoError("the simulated users stopped unexpectedly")
                        observed = await self.narrator.poll(session)
                        self.print_slack()
                        progress.update(task, **self.progress_fields(observed))
                        if observed.finished and after_decision is None:
                            after_decision = time.monotonic() + AFTER_DECISION_S
                        if after_decision is not None and time.monotonic() >= after_decision:
                            break
                        if time.monotonic() > deadline:
                            raise DemoError(self.stuck_report())
                        await asyncio.sleep(POLL_S)
                    stop_traffic.set()
                    await users
                    await self.wait_for_slack(session)
        finally:
            stop_traffic.set()
            if not users.done():
                users.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await users

    def progress_fields(self, observed: Any) -> dict[str, Any]:
        stats = self.traffic.stats if self.traffic else None
        if observed.status == "running":
            description = f"canary v2 at {percent(observed.share)}"
        else:
            description = observed.status.replace("_", " ")
        position = observed.position or 0
        completed = observed.steps if observed.status == "completed" else position
        latency = ((observed.result or {}).get("latency")) or {}
        p95 = " / ".join(
            f"{arm} p95 {row['p95']:.0f} ms"
            for arm, row in sorted(latency.items())
            if isinstance(row.get("p95"), int | float)
        )
        detail = ""
        if stats is not None:
            detail = (
                f"{stats.requests:,} predictions · {stats.users:,} users · "
                f"{stats.conversions:,} purchases"
            )
        if p95:
            detail += f" · {p95}"
        return {
            "description": description,
            "completed": completed,
            "total": max(observed.steps, 1),
            "detail": detail,
        }

    def print_slack(self) -> None:
        """Show what the Slack stand-in received: routine news in one line, decisions in full."""
        assert self.narrator is not None
        while not self.slack.inbox.empty():
            message = self.slack.inbox.get()
            self.narrator.say(f"Slack stand-in received: {message.header}")
            if message.kind not in ("advance", "manual"):
                channel = f"#alerts (stand-in on :{self.slack.port})"
                self.console.print(render(message, channel=channel))

    async def wait_for_slack(self, session: aiohttp.ClientSession) -> None:
        assert self.narrator is not None
        expected = "rollback" if self.narrator.observed.status == "rolled_back" else "complete"
        deadline = time.monotonic() + SLACK_WAIT_S
        while not self.slack.received(expected) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            self.print_slack()
        self.print_slack()

    def stuck_report(self) -> str:
        assert self.narrator is not None
        observed = self.narrator.observed
        result = observed.result or {}
        return (
            f"no decision within {self.options.timeout:.0f}s: {EXPERIMENT} is {observed.status} "
            f"at {percent(observed.share)}; last analysis: {result.get('decision')} "
            f"({result.get('reason')}).\nworker log:\n"
            + tail(self.options.data_dir / "logs" / "worker.log")
        )

    def conclude(self) -> bool:
        """Print the evidence and the summary; True if the outcome is the expected one."""
        assert self.narrator is not None and self.traffic is not None
        observed = self.narrator.observed
        scenario = self.options.scenario
        stats = self.traffic.stats
        decided = observed.decided_at or time.monotonic()
        after = self.traffic.served_since(decided + 1.5)
        decision_entry = next(
            (e for e in observed.audit if e["action"] in ("rollback", "complete")), None
        )
        table = self.narrator.evidence_table()
        if table is not None:
            self.console.print(table)
        served_to = CONTROL if observed.status == "rolled_back" else observed.winner
        share = after.get(served_to or "", 0) / max(sum(after.values()), 1)
        if after:
            self.narrator.say(
                f"afterwards: {share:.0%} of {sum(after.values()):,} predictions were served "
                f"by {served_to}"
            )
        self.narrator.say(
            f"stickiness: {stats.returning:,} returning visits; {stats.to_canary:,} moved "
            f"v1 → v2 as the ramp widened, {len(stats.to_control_at):,} v2 → v1 after the "
            f"decision, {stats.other_switches} other switches"
        )
        llm_figures = self.explain_llm(observed) if scenario.llm else None
        metrics_text = ""
        with contextlib.suppress(httpx.HTTPError):
            metrics_text = httpx.get(f"{self.base}/metrics", timeout=5).text
        counters = {
            name: sum_samples(metrics_text, name)
            for name in ("rampart_rollbacks_total", "rampart_ramp_steps_total")
        }
        self.narrator.say(
            f"/metrics: rampart_rollbacks_total {counters['rampart_rollbacks_total']:g}, "
            f"rampart_ramp_steps_total {counters['rampart_ramp_steps_total']:g}"
        )
        decided_wall = parse_time(decision_entry["created_at"]) if decision_entry else None
        early_returns = sum(
            1 for at in stats.to_control_at if decided_wall is None or at < decided_wall
        )
        slack = self.slack.received()
        elapsed = (observed.decided_at or time.monotonic()) - self.started_at
        self.outcome = {
            "scenario": scenario.name,
            "expected_status": scenario.expected_status,
            "status": observed.status,
            "winner": observed.winner,
            "seconds_to_decision": round(elapsed, 1),
            "decision_reason": decision_entry["reason"] if decision_entry else None,
            "evidence": ((decision_entry or {}).get("after") or {}).get("evidence"),
            "audit_actions": [e["action"] for e in observed.audit],
            "slack_messages": [{"kind": m.kind, "header": m.header} for m in slack],
            "served_after_decision": dict(after),
            "predictions": stats.requests,
            "failed_predictions": stats.failed,
            "status_codes": {str(k): v for k, v in stats.status_codes.items()},
            "users": stats.users,
            "returning_visits": stats.returning,
            "switches_to_canary": stats.to_canary,
            "switches_to_control": len(stats.to_control_at),
            "switches_to_control_before_decision": early_returns,
            "other_switches": stats.other_switches,
            "purchases": stats.conversions,
            "events_sent": stats.events_sent,
            "event_batches_failed": stats.event_batches_failed,
            "latency_p95_ms": {
                arm: row.get("p95")
                for arm, row in sorted(((observed.result or {}).get("latency") or {}).items())
            },
            "model_latency_us": self.model_latency,
            "labels_sent": stats.labels_sent,
            "label_batches_failed": stats.label_batches_failed,
            "metrics": counters,
            "story": self.narrator.lines,
            "llm": llm_figures,
        }
        ok = observed.status == scenario.expected_status
        if scenario.expected_status == "completed":
            ok = ok and observed.winner == CANARY
        style = "bold green" if ok else "bold red"
        verdict = "as expected" if ok else f"NOT the expected {scenario.expected_status}"
        self.console.print(
            f"\nOutcome: {observed.status.replace('_', ' ')} after {elapsed:.0f}s, {verdict}; "
            f"Slack received {len(slack)} message(s): " + ", ".join(m.kind for m in slack),
            style=style,
        )
        return ok

    def explain_llm(self, observed: Any) -> dict[str, Any] | None:
        """The llm scenario's trade-off in plain words, from the last analysis result."""
        assert self.narrator is not None and self.traffic is not None
        figures = {
            arm: (row or {}).get("llm") or {}
            for arm, row in ((observed.result or {}).get("latency") or {}).items()
        }
        small, large = figures.get(CONTROL, {}), figures.get(CANARY, {})
        if not (small.get("ttft_p95") and large.get("ttft_p95") and small.get("cost_mean")):
            return None
        conversions = self.traffic.conversion_rates()
        self.narrator.say(
            f"the large model converted {conversions.get(CANARY, 0.0):.1%} of its users "
            f"against {conversions.get(CONTROL, 0.0):.1%}, but its p95 time to first "
            f"token was {large['ttft_p95']:.0f} ms against {small['ttft_p95']:.0f} ms and an "
            f"answer cost ${large['cost_mean'] * 1000:.3f} per thousand against "
            f"${small['cost_mean'] * 1000:.3f}: the guardrails on TTFT (at most +20%) and cost "
            "(at most +50%) decide, so the small model keeps the traffic"
        )
        return {CONTROL: small, CANARY: large, "conversion": conversions}

    def write_summary(self) -> None:
        if self.options.summary is not None:
            self.options.summary.write_text(json.dumps(self.outcome, indent=2))

    def serve_until_interrupted(self) -> None:
        self.console.print(
            f"\nRampart keeps running. Open {self.base}/ and log in as "
            f"{LOGIN[0]} / {LOGIN[1]}.\n"
            f"  experiment:  {self.base}/experiments/{EXPERIMENT}/\n"
            f"  admin:       {self.base}/admin/\n"
            f"  API docs:    {self.base}/api/docs/\n"
            f"  metrics:     {self.base}/metrics   readiness: {self.base}/readyz\n"
            "Press Ctrl-C to stop.",
        )
        while True:
            self.processes.check()
            time.sleep(1)

    def stop(self) -> None:
        self.processes.stop_all()
        with contextlib.suppress(Exception):
            self.slack.stop()


def parse_time(value: str) -> float:
    """Unix time of an ISO 8601 timestamp from the API (``Z`` or an offset)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def sum_samples(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scenario_values(args: Sequence[str]) -> list[str]:
    """The values given to --scenario (``--scenario x`` or ``--scenario=x``)."""
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith("--scenario=")]
    values += [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--scenario"]
    return values


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C and `kill` both stop the demo cleanly, children included, even when the shell
    # that started it made SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    args = list(sys.argv[1:] if argv is None else argv)
    if "shadow" in _scenario_values(args):
        # Its own story (two shadows, paired verdicts, a canary started from one).
        from scripts.demo_shadow import main as shadow_main

        return shadow_main(args)
    options = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    scenario = options.scenario
    console.rule("Rampart demo")
    console.print(
        f"Scenario [bold]{scenario.name}[/bold]: {scenario.summary}. "
        f"Simulated users: {options.rate:g} visits/s.\n"
    )
    demo = Demo(options, console)
    try:
        traffic_key, admin_key = demo.setup()
        asyncio.run(demo.run_story(traffic_key, admin_key))
        ok = demo.conclude()
        demo.write_summary()
        if options.exit:
            return 0 if ok else 1
        demo.serve_until_interrupted()
    except DemoError as error:
        console.print(f"\nThe demo failed: {error}", style="bold red", markup=False)
        return 1
    except KeyboardInterrupt:
        console.print("\nStopping.")
    finally:
        demo.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
