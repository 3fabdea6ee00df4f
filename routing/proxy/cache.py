"""The per-experiment prediction cache: a bounded TTL cache of upstream answers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    expires_at: float
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class PredictionCache:
    """A bounded TTL cache of upstream answers, least recently used evicted first."""

    __slots__ = ("_entries", "max_entries", "ttl_s")

    def __init__(self, *, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max(1, max_entries)
        self._entries: OrderedDict[tuple[str, str, str, bytes], CachedAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str, str, bytes], now: float) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(
        self,
        key: tuple[str, str, str, bytes],
        *,
        now: float,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        entries = self._entries
        entries[key] = CachedAnswer(now + self.ttl_s, status, tuple(headers), body)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
