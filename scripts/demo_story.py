"""The narrator of `make demo`: reads the platform's own APIs and tells what happens.

Every line of the story comes from Rampart itself: the experiment's status and ramp step from
``GET /api/v1/experiments/<key>/``, what changed and why from its audit log
(``.../audit/``), the statistics behind a decision from the analysis results
(``.../results/``), and the alerts from the Slack stand-in. The narrator only reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

TERMINAL = ("rolled_back", "completed")


def percent(value: Any, signed: bool = False, missing: str = "n/a") -> str:
    if not isinstance(value, int | float):
        return missing
    return f"{value * 100:+.1f}%" if signed else f"{value * 100:g}%"


def milliseconds(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "n/a"


@dataclass
class Observed:
    """What the narrator has seen so far."""

    status: str = "draft"
    share: float | None = None
    position: int | None = None
    steps: int = 0
    first_share: float | None = None
    winner: str | None = None
    audit_seen: set[int] = field(default_factory=set)
    audit: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    decided_at: float | None = None  # time.monotonic() when a terminal status was first seen

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class Narrator:
    """Polls the management API and prints each new audit entry as a line of the story."""

    def __init__(
        self,
        *,
        console: Console,
        base_url: str,
        experiment: str,
        api_key: str,
        started_at: float,
    ) -> None:
        self.console = console
        self.base_url = base_url.rstrip("/")
        self.experiment = experiment
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.started_at = started_at
        self.observed = Observed()
        self.lines: list[str] = []
        self._polls = 0

    def say(self, text: str, style: str = "") -> None:
        """Print one line of the story with the seconds since the demo started."""
        elapsed = time.monotonic() - self.started_at
        line = f"[{elapsed:6.1f}s] {text}"
        self.lines.append(line)
        self.console.print(line, style=style, highlight=False, markup=False)

    async def _get(self, session: aiohttp.ClientSession, path: str) -> Any:
        async with session.get(f"{self.base_url}{path}", headers=self.headers) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            return await response.json()

    async def poll(self, session: aiohttp.ClientSession) -> Observed:
        """Read status, audit log and latest result once; narrate what is new."""
        path = f"/api/v1/experiments/{self.experiment}/"
        experiment = await self._get(session, path)
        observed = self.observed
        if experiment is not None:
            observed.status = experiment["status"]
            observed.steps = len(experiment["ramp_steps"])
            if experiment["ramp_steps"]:
                observed.first_share = experiment["ramp_steps"][0]["canary_share"]
            observed.position = experiment["ramp_position"]
            step = experiment["current_step"]
            observed.share = step["canary_share"] if step else None
            observed.winner = experiment["winner"]
        audit = await self._get(session, f"{path}audit/")
        entries = audit["results"] if isinstance(audit, dict) else audit or []
        for entry in sorted(entries, key=lambda e: e["id"]):
            if entry["id"] not in observed.audit_seen:
                observed.audit_seen.add(entry["id"])
                observed.audit.append(entry)
                self._narrate(entry)
        # The latest result changes once per analysis interval; reading it every other poll
        # keeps the narrator's load on the web app (which shares the edge's process) small.
        self._polls += 1
        if self._polls % 2 == 1 or observed.finished:
            observed.result = await self._get(session, f"{path}results/") or observed.result
        if observed.finished and observed.decided_at is None:
            observed.decided_at = time.monotonic()
        return observed

    def _narrate(self, entry: dict[str, Any]) -> None:
        action = entry["action"]
        after = entry.get("after") or {}
        who = entry["actor"]
        reason = entry.get("reason") or ""
        if action == "create":
            self.say(f"{who} created the experiment (draft)")
        elif action == "start":
            share = after.get("canary_share", self.observed.first_share)
            self.say(f"{who} started the canary: v2 gets {percent(share)} of users", "bold")
        elif action == "advance":
            share = percent(after.get("canary_share"))
            self.say(f"{who}: ramp step passed, canary widened to {share} ({reason})", "green")
        elif action == "rollback":
            self.say(f"{who}: GUARDRAIL BREACHED, rolled back: {reason}", "bold red")
        elif action == "complete":
            winner = after.get("winner") or self.observed.winner
            self.say(f"{who}: canary completed, {winner} is the winner ({reason})", "bold green")
        else:
            self.say(f"{who}: {action} {reason}".rstrip())

    def evidence_table(self) -> Table | None:
        """The numbers behind a rollback: the audit entry's evidence and the latency table."""
        rollback = next((e for e in self.observed.audit if e["action"] == "rollback"), None)
        if rollback is None:
            return None
        evidence = (rollback.get("after") or {}).get("evidence") or {}
        table = Table(title="Evidence (audit log and analysis results)", title_justify="left")
        table.add_column("what")
        table.add_column("value")
        table.add_row(
            "guardrail",
            f"{evidence.get('metric')} (tolerated harm {percent(evidence.get('margin'))})",
        )
        table.add_row("arms", f"{evidence.get('arm')} vs {evidence.get('control_arm')}")
        level = evidence.get("interval_level")
        interval = evidence.get("interval") or [None, None]
        table.add_row("relative effect", percent(evidence.get("rel_effect"), signed=True))
        low = percent(interval[0], signed=True, missing="-unbounded")
        high = percent(interval[1], signed=True, missing="unbounded")
        table.add_row(
            f"{percent(level)} always-valid interval" if level else "always-valid interval",
            f"{low} to {high}",
        )
        counts = evidence.get("n") or {}
        table.add_row(
            "n per arm (the test's units)", ", ".join(f"{k}: {v:,}" for k, v in counts.items())
        )
        latency = (self.observed.result or {}).get("latency") or {}
        for arm, row in sorted(latency.items()):
            table.add_row(
                f"latency {arm}",
                f"p50 {milliseconds(row.get('p50'))}, p95 {milliseconds(row.get('p95'))}, "
                f"p99 {milliseconds(row.get('p99'))} (n={row.get('n', 0):,})",
            )
        table.add_row("audit", f"{rollback['actor']} at {rollback['created_at']}")
        return table
