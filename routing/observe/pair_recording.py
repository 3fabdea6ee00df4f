"""The observation aggregator's side of the shadow pair claims (``routing.observe.pair_claims``).

A mixin of ``routing.observe.observations.ObservationAggregator``: ``claim_pair`` when a user's
pair is chosen, the pair offered when its answers are compared, and the claims settled at the
start of every flush (in the writer thread), so the won claims' pairs are in that flush's cells.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from routing.observe.backoff import FailureLog
from routing.observe.pair_claims import Claim, ClaimKey, HeldPair, PairClaims, write_claims
from routing.observe.shadow_pairs import PairCell


class PairRecording(ABC):
    """Claims, offers and settles users' shadow pairs; the host keeps the cells."""

    pair_claims: PairClaims
    _bucket_s: int
    _clock: Callable[[], float]
    _executor: ThreadPoolExecutor | None
    _failure_log: FailureLog

    @abstractmethod
    def _pair_cells(self, experiment_id: int, variant_key: str, bucket: int) -> PairCell:
        """The host's open cell of an experiment's shadow in a bucket."""

    def claim_pair(self, experiment_id: int, variant_key: str, unit: str) -> None:
        """This process chose the user's pair with a shadow (before any answer); the flush
        settles the claim."""
        self.pair_claims.claim(experiment_id, variant_key, unit)

    def _offer_pair(
        self,
        experiment_id: int,
        unit: str,
        variant_key: str,
        control_ms: float,
        shadow_ms: float,
        disagreed: bool,
        abs_diff: float | None,
    ) -> None:
        bucket = int(self._clock() // self._bucket_s)
        pair = HeldPair(variant_key, bucket, control_ms, shadow_ms, disagreed, abs_diff)
        if self.pair_claims.offer(experiment_id, unit, pair):
            self._count_pair(experiment_id, pair)

    def _count_pair(self, experiment_id: int, pair: HeldPair) -> None:
        self._pair_cells(experiment_id, pair.variant_key, pair.bucket).add(
            pair.control_ms, pair.shadow_ms, disagreed=pair.disagreed, abs_diff=pair.abs_diff
        )

    def _settle(self, claims: list[Claim], won: set[ClaimKey]) -> None:
        for experiment_id, pair in self.pair_claims.settle(claims, won):
            self._count_pair(experiment_id, pair)

    def settle_claims_now(self) -> None:
        """Write the queued claims and count the won ones' pairs, in the calling thread.

        On failure the claims are kept and the exception propagates.
        """
        claims = self.pair_claims.drain()
        if not claims:
            return
        try:
            won = write_claims(claims)
        except Exception:
            self.pair_claims.restore(claims)
            raise
        self._settle(claims, won)

    async def settle_claims(self) -> None:
        """Write the queued claims from the writer thread; on failure keep them (logged)."""
        claims = self.pair_claims.drain()
        if not claims:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="rampart-observations")
        loop = asyncio.get_running_loop()
        try:
            won = await loop.run_in_executor(self._executor, write_claims, claims)
        except Exception as error:
            self.pair_claims.restore(claims)
            self._failure_log.failed(
                error, f"{len(claims)} shadow pair claim(s) kept for the next attempt"
            )
            return
        self._settle(claims, won)
