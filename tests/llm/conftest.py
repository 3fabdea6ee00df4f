"""A real uvicorn edge serving the proxy in front of two stand-in LLMs (small and large)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from experiments import services
from routing.models import ObservationBucket
from routing.observe.llm_stats import LLMCell
from tests.llm_server import ServedLLM
from tests.processes import free_port, start_process, stop_process, wait_for_http

SMALL_PRICES = (0.5, 1.5)
LARGE_PRICES = (3.0, 15.0)


@dataclass
class LLMEdge:
    url: str
    key: str
    experiment_id: int
    small: ServedLLM
    large: ServedLLM
    process: subprocess.Popen[bytes]

    def proxy(self, experiment: str = "chat") -> str:
        return f"{self.url}/proxy/{experiment}/v1"

    def stop(self) -> None:
        """Stop the edge gracefully: its shutdown writes every buffered observation."""
        stop_process(self.process)

    def cells(self) -> dict[str, LLMCell]:
        """The LLM statistics written so far, merged per variant."""
        merged: dict[str, LLMCell] = {}
        rows = ObservationBucket.objects.filter(experiment_id=self.experiment_id).exclude(llm="")
        for variant, text in rows.values_list("variant_key", "llm"):
            merged.setdefault(variant, LLMCell()).merge(LLMCell.from_json(text))
        return merged


@pytest.fixture
def llms() -> Iterator[tuple[ServedLLM, ServedLLM]]:
    small = ServedLLM(name="small", ttft_ms=40.0, tokens_per_s=400.0, output_tokens=8).start()
    large = ServedLLM(name="large", ttft_ms=150.0, tokens_per_s=100.0, output_tokens=12).start()
    yield small, large
    small.stop()
    large.stop()


def start_llm_edge(
    make_key: Callable[..., str],
    llms: tuple[ServedLLM, ServedLLM],
    log: Path,
    *,
    large_weight: float = 0.5,
    extra: dict[str, object] | None = None,
    unit_source: tuple[str, str] = ("json_field", "user"),
) -> LLMEdge:
    small, large = llms
    key = make_key("decide")
    experiment = services.experiment_create(
        actor="test",
        key="chat",
        name="chat",
        kind="ab",
        unit_source=unit_source[0],
        unit_attribute=unit_source[1],
        variants=[
            services.VariantInput(
                key="small",
                upstream_url=small.url,
                weight=1 - large_weight,
                is_control=True,
                price_input_per_m=SMALL_PRICES[0],
                price_output_per_m=SMALL_PRICES[1],
            ),
            services.VariantInput(
                key="large",
                upstream_url=large.url,
                weight=large_weight,
                price_input_per_m=LARGE_PRICES[0],
                price_output_per_m=LARGE_PRICES[1],
            ),
        ],
        **(extra or {}),
    )
    services.experiment_start(actor="test", key="chat")
    port = free_port()
    process = start_process(
        [
            "-m",
            "uvicorn",
            "tests.model_server:proxy_edge",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "routing.edge.server:EdgeHttpProtocol",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env={"EDGE_REQUIRE_KEY": "true", "RECORDER_FLUSH_S": "0.2"},
        log=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/proxy/")
    except BaseException:
        stop_process(process)
        raise
    return LLMEdge(url, key, int(experiment.id), small, large, process)


@pytest.fixture
def llm_edge(
    make_key: Callable[..., str], llms: tuple[ServedLLM, ServedLLM], tmp_path: Path
) -> Iterator[LLMEdge]:
    edge = start_llm_edge(make_key, llms, tmp_path / "edge.log")
    try:
        yield edge
    finally:
        edge.stop()


def users_for(experiment: str, variant: str, count: int) -> list[str]:
    """User ids the running experiment assigns to ``variant`` (the edge's own hashing)."""
    from routing.snapshot import load_snapshot

    route = load_snapshot().route(experiment)
    assert route is not None
    users = [f"user-{i}" for i in range(500) if route.decide(f"user-{i}").variant == variant]
    assert len(users) >= count
    return users[:count]


LLM_METRICS = (
    ("ttft-p95", "p95 time to first token", "quantile", "ttft_ms", 0.95, "lower"),
    ("ttft-mean", "Mean time to first token", "mean", "ttft_ms", None, "lower"),
    ("tokens-per-s", "Output tokens per second", "mean", "output_tokens_per_s", None, "higher"),
    ("output-tokens", "Output tokens per request", "mean", "output_tokens", None, "lower"),
    ("cost-per-request", "Cost per request", "mean", "cost", None, "lower"),
)


@pytest.fixture
def llm_metrics(db: None) -> list[str]:
    """The generative-model metrics in the catalogue, as an operator would define them."""
    return create_llm_metrics()


def create_llm_metrics() -> list[str]:
    """Create the generative-model metrics of ``LLM_METRICS``; returns their keys."""
    for key, name, kind, source, quantile, direction in LLM_METRICS:
        services.metric_create(
            actor="test",
            key=key,
            name=name,
            kind=kind,
            source=source,
            quantile=quantile,
            direction=direction,
        )
    return [m[0] for m in LLM_METRICS]
