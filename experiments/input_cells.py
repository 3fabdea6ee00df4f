"""Cells of a watched number on the proxy's fixed signed log grid (input drift), pure.

Shared by the proxy, which bins values (``routing.proxy.inputs``), and the analysis, which
orders the cells to merge them (``analysis.input_drift``). Four cells per decade from 1e-3 to
1e6 (values beyond are clamped into the end cells), zero on its own, negatives mirrored: the
cells are fixed, so counts from any time of an experiment merge.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Final

# Cells of k/4 decades, k in [LOG_LOW, LOG_HIGH] (1e-3 .. 1e6), clamped.
LOG_LOW: Final = -12
LOG_HIGH: Final = 24


# The cells' lower ends 10^(k/4) for k in (LOG_LOW, LOG_HIGH] and their labels, so binning
# is one bisect and no formatting (it runs on the proxy's request path).
_EDGES: Final = tuple(10 ** (k / 4) for k in range(LOG_LOW + 1, LOG_HIGH + 1))
_POSITIVE: Final = tuple(f"+{k}" for k in range(LOG_LOW, LOG_HIGH + 1))
_NEGATIVE: Final = tuple(f"-{k}" for k in range(LOG_LOW, LOG_HIGH + 1))


def log_cell(value: float) -> str:
    """The log-grid cell of a number: "0", "+k" or "-k" (|value| in [10^(k/4), 10^((k+1)/4)))."""
    if value > 0:
        return _POSITIVE[bisect_right(_EDGES, value)]
    if value < 0:
        return _NEGATIVE[bisect_right(_EDGES, -value)]
    return "0"


def cell_order(cell: str) -> float:
    """A number cell's position on the line (its lower end), for ordering and merging."""
    if cell == "0":
        return 0.0
    if cell[0] in "+-":
        return float(cell[0] + "1") * 10 ** (int(cell[1:]) / 4)
    return float(cell)  # a configured bin index
