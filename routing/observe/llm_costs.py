"""Each user's cost of generative answers, written as business events for cost per conversion.

Cost per conversion is a ratio of two per-user sums, the user's cost and the user's conversions,
inside the metric's exposure window; the analysis already computes such ratios from business
events (``analysis.unit_metrics``, ratio metrics). So the proxy sums each user's cost between
two observation flushes and writes the sums as events named ``llm_cost`` (value: the cost,
timestamp: the user's first answer in that interval, so at most RECORDER_FLUSH_S early), with
the observations. A ratio metric ``numerator_event="llm_cost"``, ``denominator_event=
"purchase"`` is then cost per conversion, windowed and stratified like any other ratio. Rows
grow with users and flushes, not with requests. A user in two LLM experiments at once has the
cost of both in its events.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

COST_EVENT: Final = "llm_cost"

# (event_id, unit_id, name, value, timestamp), as routing.observe.event_store.EventRow
CostRow = tuple[str, str, str, float, datetime]


class UnitCosts:
    """Cost sums per user since the last drain (event loop thread only)."""

    def __init__(self) -> None:
        self._costs: dict[str, list[float]] = {}

    def add(self, unit: str, cost: float, now: float) -> None:
        entry = self._costs.get(unit)
        if entry is None:
            self._costs[unit] = [cost, now]
        else:
            entry[0] += cost

    def __len__(self) -> int:
        return len(self._costs)

    def drain(self) -> list[CostRow]:
        """The sums as event rows; the book starts again empty."""
        costs, self._costs = self._costs, {}
        return [
            (f"{COST_EVENT}:{uuid.uuid4().hex}", unit, COST_EVENT, total, _time(first))
            for unit, (total, first) in costs.items()
        ]

    def restore(self, rows: Sequence[CostRow]) -> None:
        """Put back rows that were not written (they are written again, with new ids)."""
        for _, unit, _, total, at in rows:
            self.add(unit, total, at.timestamp())


def _time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)
