"""One shadow pair per user and shadow across every edge process: claims settled by a unique key.

Each edge process picks a user's first mirrored request to a shadow as the user's pair for that
shadow (``routing.proxy.shadow``), so with N edge processes a user could give N pairs, and the
pairs would stop being one per user (STATS.md 12.1). The fix: when a process picks a user's
pair it queues a *claim* ``(experiment, shadow, user)`` here, before any answer exists. The
flush writes the queued claims to ``routing.models.ShadowPairClaim`` (unique on experiment,
shadow and user) with ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, so exactly one process's
claim is stored and only that process learns it won. A pair is held here until its claim is
settled: a won claim's pair goes into the per-bucket ``PairCell`` sums (now, or when it
arrives), a lost claim's pair is dropped. Claims are per shadow, so a shadow added to a running
experiment gets the first pair of every user, including users already paired with another
shadow.

Why claims at decision time and not the pairs themselves: which pair of a user counts must not
depend on its outcome. Had the first pair *written* won, a fast shadow answer (flushed sooner)
would beat a slow one of the same user in another process, and the p95 would be biased low. A
claim is queued when the request is mirrored and written by the next flush, whose timing does
not depend on any answer, so the choice between processes is as blind to the outcome as the
choice within one.

Cost: one claim row per (experiment, shadow, user), so storage grows with users (like
``UnitOutcome``), not with traffic; per process, at most one claim per user and shadow
(``Shadows`` remembers its users), a
dict entry per claim until it is settled, and a settled claim's outcome kept ``keep_s``
seconds for its pairs still in flight (a shadow call ends within the proxy's timeouts, far
below that). Nothing here runs on the forwarding path except ``claim`` (a dict insert), called
from the shadow's ``mirror`` after control's answer is under way; the database work is in the
flush's writer thread, so shadow pairing never delays an answer.

A flush whose claim write fails keeps its claims for the next one (nothing was written:
one transaction), and their pairs stay held. Claims written before they were per shadow (one
per experiment and user) were made one per shadow of the experiment by the migration
``routing.0012_shadow_pair_claims_per_shadow``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# (experiment id, shadow's variant key, unit)
ClaimKey = tuple[int, str, str]
# A claim to write: (experiment id, shadow's variant key, unit, chosen at (epoch s))
Claim = tuple[int, str, str, float]
# A settled claim's outcome is kept this long for its pairs still in flight.
KEEP_S = 300.0


@dataclass(frozen=True, slots=True)
class HeldPair:
    """A user's pair for one shadow, waiting for its claim to be settled."""

    variant_key: str
    bucket: int
    control_ms: float
    shadow_ms: float
    disagreed: bool
    abs_diff: float | None


class PairClaims:
    """Claims of this process, their pairs until settled, and settled claims' outcomes."""

    def __init__(self, *, clock: Callable[[], float] = time.time, keep_s: float = KEEP_S) -> None:
        self._clock = clock
        self._keep_s = keep_s
        # Queued claims (not yet written) -> when the pair was chosen (epoch seconds).
        self._queued: dict[ClaimKey, float] = {}
        # Claims written by a flush in progress (between drain and settle).
        self._writing: set[ClaimKey] = set()
        self._held: dict[ClaimKey, list[HeldPair]] = {}
        # Settled claims -> (won, settled at), oldest first.
        self._settled: dict[ClaimKey, tuple[bool, float]] = {}

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def held(self) -> int:
        return sum(len(pairs) for pairs in self._held.values())

    def claim(self, experiment_id: int, variant_key: str, unit: str) -> None:
        """Queue the claim of a user's pair with a shadow (called when the pair is chosen)."""
        key = (experiment_id, variant_key, unit)
        if key not in self._settled and key not in self._writing:
            self._queued.setdefault(key, self._clock())

    def offer(self, experiment_id: int, unit: str, pair: HeldPair) -> bool:
        """A user's pair with ``pair.variant_key`` arrived: True to count it now (its claim was
        won); else it is held (claim not settled yet) or dropped (claim lost, or never made
        here)."""
        key = (experiment_id, pair.variant_key, unit)
        settled = self._settled.get(key)
        if settled is not None:
            return settled[0]
        if key in self._queued or key in self._writing:
            self._held.setdefault(key, []).append(pair)
        return False

    def drain(self) -> list[Claim]:
        """Take the queued claims for writing."""
        queued, self._queued = self._queued, {}
        self._writing.update(queued)
        return [(*key, at) for key, at in queued.items()]

    def restore(self, claims: Sequence[Claim]) -> None:
        """Put back claims whose write failed (their pairs stay held)."""
        for experiment_id, variant_key, unit, at in claims:
            key = (experiment_id, variant_key, unit)
            self._writing.discard(key)
            self._queued.setdefault(key, at)

    def settle(self, claims: Sequence[Claim], won: set[ClaimKey]) -> list[tuple[int, HeldPair]]:
        """Record the written claims' outcomes; returns the held pairs of the won ones
        (with their experiment id) to count now. Forgets outcomes older than ``keep_s``."""
        now = self._clock()
        counted: list[tuple[int, HeldPair]] = []
        for experiment_id, variant_key, unit, _ in claims:
            key = (experiment_id, variant_key, unit)
            self._writing.discard(key)
            is_won = key in won
            self._settled[key] = (is_won, now)
            pairs = self._held.pop(key, [])
            if is_won:
                counted.extend((experiment_id, pair) for pair in pairs)
        horizon = now - self._keep_s
        for key, (_, at) in list(self._settled.items()):
            if at >= horizon:
                break
            del self._settled[key]
        return counted


def write_claims(claims: Sequence[Claim], *, batch_rows: int = 500) -> set[ClaimKey]:
    """Insert the claims, keeping any already stored; returns the ones this call stored.

    One transaction. Claims of experiments deleted meanwhile are skipped (and not won).
    """
    from django.db import IntegrityError, close_old_connections

    from experiments.selectors import experiment_view_by_id
    from routing.db import insert_returning
    from routing.models import ShadowPairClaim

    if not claims:
        return set()
    close_old_connections()

    def insert(rows: Sequence[Claim]) -> set[ClaimKey]:
        inserted = insert_returning(
            ShadowPairClaim._meta.db_table,
            ("experiment_id", "variant_key", "unit_id", "claimed_at"),
            rows,
            batch=batch_rows,
            unique=("experiment_id", "variant_key", "unit_id"),
            returning=("experiment_id", "variant_key", "unit_id"),
        )
        return {(int(experiment_id), str(key), str(unit)) for experiment_id, key, unit in inserted}

    try:
        return insert(claims)
    except IntegrityError:
        existing = {
            experiment_id
            for experiment_id in {row[0] for row in claims}
            if experiment_view_by_id(experiment_id=experiment_id) is not None
        }
        return insert([row for row in claims if row[0] in existing])
