"""Load the demo catalogue and a demo canary experiment (idempotent)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from experiments import selectors, services
from experiments.errors import NotFound

DEMO_METRICS: list[dict[str, Any]] = [
    {
        "key": "latency-p95",
        "name": "p95 latency",
        "kind": "quantile",
        "source": "latency_ms",
        "quantile": 0.95,
        "direction": "lower",
        "description": "95th percentile of upstream latency measured by the proxy.",
    },
    {
        "key": "latency-mean",
        "name": "Mean latency",
        "kind": "mean",
        "source": "latency_ms",
        "direction": "lower",
        "description": "Average upstream latency measured by the proxy.",
    },
    {
        "key": "error-rate",
        "name": "Error rate",
        "kind": "binomial",
        "source": "error",
        "direction": "lower",
        "description": "Share of proxied requests that failed (5xx, timeout).",
    },
    {
        "key": "conversion",
        "name": "Conversion",
        "kind": "binomial",
        "source": "purchase",
        "direction": "higher",
        "description": "Share of users with at least one purchase.",
    },
    {
        "key": "revenue",
        "name": "Revenue per user",
        "kind": "mean",
        "source": "revenue",
        "direction": "higher",
        "description": "Revenue per exposed user.",
    },
    {
        "key": "accuracy",
        "name": "Accuracy",
        "kind": "mean",
        "source": "quality:accuracy",
        "direction": "higher",
        "window_s": 30,
        "description": "Share of a user's predictions that match the label sent later.",
    },
    {
        "key": "ttft-p95",
        "name": "p95 time to first token",
        "kind": "quantile",
        "source": "ttft_ms",
        "quantile": 0.95,
        "direction": "lower",
        "description": "95th percentile of the time to the first streamed token.",
    },
    {
        "key": "tokens-per-s",
        "name": "Output tokens per second",
        "kind": "mean",
        "source": "output_tokens_per_s",
        "direction": "higher",
        "description": "Mean of each answer's output tokens over its duration.",
    },
    {
        "key": "cost-per-request",
        "name": "Cost per request",
        "kind": "mean",
        "source": "cost",
        "direction": "lower",
        "description": "Tokens times the version's prices, per answer.",
    },
    {
        "key": "cost-per-conversion",
        "name": "Cost per conversion",
        "kind": "ratio",
        "numerator_event": "llm_cost",
        "denominator_event": "purchase",
        "direction": "lower",
        "description": "Users' LLM cost (llm_cost events from the proxy) per purchase.",
    },
]
# The LLM scenario's prices per million (input, output) tokens: a small and a large model.
LLM_PRICES = {"v1": (0.15, 0.60), "v2": (2.50, 10.00)}


class Command(BaseCommand):
    help = "Create the demo metrics and a demo canary experiment (v1 control, v2 canary)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--key", default="ranker-canary")
        parser.add_argument("--control-url", default="http://127.0.0.1:9101")
        parser.add_argument("--canary-url", default="http://127.0.0.1:9102")
        parser.add_argument("--step-seconds", type=int, default=20)
        parser.add_argument("--step-exposures", type=int, default=100)
        parser.add_argument(
            "--quality",
            action="store_true",
            help="read the digit in each answer ('label') and guard accuracy (1-point margin)",
        )
        parser.add_argument(
            "--llm",
            action="store_true",
            help="an LLM canary: small v1 against large v2, TTFT and cost guardrails",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        for spec in DEMO_METRICS:
            try:
                selectors.metric_get(key=spec["key"])
            except NotFound:
                services.metric_create(actor="demo", **spec)
        key = options["key"]
        try:
            selectors.experiment_get(key=key)
            self.stdout.write(f"Demo experiment {key} already exists")
            return
        except NotFound:
            pass
        if options["llm"]:
            self._create_llm(key, options)
            self.stdout.write(f"Created demo experiment {key}")
            return
        quality: dict[str, Any] = {}
        uses = [
            services.MetricUseInput("latency-p95", "guardrail", 0.10),
            services.MetricUseInput("error-rate", "guardrail", 0.0),
            services.MetricUseInput("conversion", "primary"),
            services.MetricUseInput("revenue", "secondary"),
        ]
        if options["quality"]:
            quality = {
                "quality_enabled": True,
                "quality_prediction_path": "label",
                "quality_prediction_kind": "class",
            }
            uses.insert(2, services.MetricUseInput("accuracy", "guardrail", 0.01))
        services.experiment_create(
            actor="demo",
            key=key,
            name="Ranker v2 canary",
            kind="canary",
            description="A new ranking model rolled out gradually behind Rampart.",
            hypothesis="v2 raises conversion without hurting latency or errors.",
            variants=[
                services.VariantInput(
                    key="v1",
                    name="Ranker v1",
                    upstream_url=options["control_url"],
                    weight=0.5,
                    is_control=True,
                ),
                services.VariantInput(
                    key="v2", name="Ranker v2", upstream_url=options["canary_url"], weight=0.5
                ),
            ],
            metrics=uses,
            ramp_steps=[
                services.RampStepInput(share, options["step_seconds"], options["step_exposures"])
                for share in services.DEFAULT_RAMP
            ],
            **quality,
        )
        self.stdout.write(f"Created demo experiment {key}")

    def _create_llm(self, key: str, options: dict[str, Any]) -> None:
        """A chat assistant: the user comes from the OpenAI ``user`` field of each request."""
        services.experiment_create(
            actor="demo",
            key=key,
            name="Assistant: large model canary",
            kind="canary",
            description="A larger chat model rolled out behind Rampart's OpenAI-compatible proxy.",
            hypothesis="The large model converts better; is it fast and cheap enough?",
            unit_source="json_field",
            unit_attribute="user",
            variants=[
                services.VariantInput(
                    key=name,
                    name=label,
                    upstream_url=options[url],
                    weight=0.5,
                    is_control=name == "v1",
                    price_input_per_m=LLM_PRICES[name][0],
                    price_output_per_m=LLM_PRICES[name][1],
                )
                for name, label, url in (
                    ("v1", "Small model", "control_url"),
                    ("v2", "Large model", "canary_url"),
                )
            ],
            metrics=[
                services.MetricUseInput("ttft-p95", "guardrail", 0.20),
                services.MetricUseInput("cost-per-request", "guardrail", 0.50),
                services.MetricUseInput("error-rate", "guardrail", 0.0),
                services.MetricUseInput("conversion", "primary"),
                services.MetricUseInput("tokens-per-s", "secondary"),
                services.MetricUseInput("cost-per-conversion", "secondary"),
            ],
            ramp_steps=[
                services.RampStepInput(share, options["step_seconds"], options["step_exposures"])
                for share in services.DEFAULT_RAMP
            ],
        )
