"""Log-bucketed latency histogram: the proxy's mergeable, compact record of request latencies.

The routing proxy records the upstream latency of every forwarded request, in milliseconds, into
one :class:`LogHistogram` per (experiment, variant, 10-second bucket), flushes it to the database
as JSON text, and the analysis merges many of them and computes quantiles and quantile confidence
sequences (``analysis.stats.quantiles``). This docstring is the format's specification.

Buckets (DDSketch, Masson, Rim & Lee 2019, "DDSketch: a fast and fully-mergeable quantile sketch
with relative-error guarantees", PVLDB 12(12))
    With relative accuracy ``a`` (default 0.01) let ``gamma = (1 + a) / (1 - a)``. A recorded value
    ``x`` goes to bucket ``i = ceil(log(x) / log(gamma))``, so bucket ``i`` holds the values in the
    half-open interval ``(gamma**(i - 1), gamma**i]``. Its representative value
    ``2 * gamma**i / (gamma + 1)`` is within relative distance ``a`` of every value in the bucket,
    hence every quantile this histogram returns is within 1% of the exact sample quantile it stands
    for (up to floating-point rounding, about 1e-15 relative).

Values outside the range
    * ``0 <= x < MIN_VALUE_MS`` (0.001 ms = 1 microsecond) is recorded as ``MIN_VALUE_MS``; such
      values are below any latency a network proxy can measure, so only their count matters.
      The lowest bucket's lower edge is therefore 0, not ``gamma**(i - 1)``.
    * ``x > MAX_VALUE_MS`` (1e7 ms, about 2.8 hours; no proxied request lives that long) is recorded
      as ``MAX_VALUE_MS``, and the highest bucket's upper edge is +infinity.
    * Negative values, NaN and infinities are errors (``ValueError``): they mean a broken clock or a
      bug upstream, and silently binning them would corrupt every quantile.
    Clamping keeps the bucket index range bounded (1,152 buckets at a = 0.01) whatever the
    input, and the bucket edges above make the clamped buckets honest for conservative bounds.

Quantiles
    ``quantile(p)`` is the representative value of the bucket that holds order statistic
    ``k = max(1, ceil(p * n))`` (1-based) of the ``n`` recorded values: the "inverted CDF"
    definition, Hyndman & Fan (1996) type 1, i.e. ``numpy.quantile(..., method="inverted_cdf")``.
    That definition returns an actual observation, so the 1% bound above applies to it. Bucket
    edges (``lower_edge(i)``, ``upper_edge(i)``) bound every value in the bucket; the quantile
    confidence sequences use the lower edge for lower bounds and the upper edge for upper bounds,
    so bucketing widens them and never narrows them.

Merging
    Two histograms with the same ``a`` merge by adding counts bucket by bucket (and adding the
    sums); the result equals the histogram of the concatenated data exactly (the counts) or up
    to floating-point summation order (the sums).

JSON format, version 1 (stored as text in the database; compact, no whitespace)::

    {"v":1,"a":0.01,"n":7,"s":891.3,"q":117104.0,"b":[[230,1,0,2],[250,4]]}

    * ``v``: format version, 1.
    * ``a``: relative accuracy (bucketing parameter); merging requires equal ``a``.
    * ``n``: total count; must equal the sum of all bucket counts.
    * ``s``, ``q``: sum and sum of squares of the recorded (clamped) values, in ms and ms^2, for
      the mean-based latency metrics.
    * ``b``: the non-empty part of the histogram as runs of consecutive buckets in increasing index
      order. Each run is ``[first_index, count_0, count_1, ...]`` for buckets ``first_index``,
      ``first_index + 1``, ... A run may contain zeros; the encoder starts a new run when more than
      three consecutive buckets are empty, because a new run header costs about as much as four
      zeros. Runs never overlap.

Hot path
    ``add`` uses only ``math.log``/``math.ceil`` and a dict update (a few hundred nanoseconds in
    CPython); this module imports nothing outside the standard library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

FORMAT_VERSION = 1
DEFAULT_RELATIVE_ACCURACY = 0.01
MIN_VALUE_MS = 0.001
MAX_VALUE_MS = 1e7

# A zero run longer than this starts a new JSON run: "0," costs two characters per empty bucket,
# and a run break "],[123," costs about seven.
_MAX_ZEROS_IN_RUN = 3


class LogHistogram:
    """Counts of latencies (ms) in log-spaced buckets with a relative-error bound on quantiles."""

    __slots__ = (
        "_count",
        "_counts",
        "_gamma",
        "_inverse_log_gamma",
        "_log_gamma",
        "_max_index",
        "_min_index",
        "_relative_accuracy",
        "_sum",
        "_sum_of_squares",
    )

    def __init__(self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
        self._relative_accuracy = float(relative_accuracy)
        self._gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy)
        self._log_gamma = math.log(self._gamma)
        self._inverse_log_gamma = 1.0 / self._log_gamma
        self._counts: dict[int, int] = {}
        self._count = 0
        self._sum = 0.0
        self._sum_of_squares = 0.0
        self._min_index = self.bucket_index(MIN_VALUE_MS)
        self._max_index = self.bucket_index(MAX_VALUE_MS)

    # ----------------------------------------------------------------- recording (hot path)

    def add(self, value_ms: float) -> None:
        """Record one latency in milliseconds (clamped to [MIN_VALUE_MS, MAX_VALUE_MS])."""
        # One comparison chain handles the common case; NaN fails both tests below.
        if not MIN_VALUE_MS <= value_ms <= MAX_VALUE_MS:
            value_ms = _clamp(value_ms)
        index = math.ceil(math.log(value_ms) * self._inverse_log_gamma)
        counts = self._counts
        counts[index] = counts.get(index, 0) + 1
        self._count += 1
        self._sum += value_ms
        self._sum_of_squares += value_ms * value_ms

    def add_many(self, values_ms: Iterable[float]) -> None:
        """Record several latencies (ms); same rules as :meth:`add`."""
        for value_ms in values_ms:
            self.add(value_ms)

    # ----------------------------------------------------------------- buckets

    @property
    def relative_accuracy(self) -> float:
        """Bucketing parameter ``a``: a bucket's representative is within ``a`` of its values."""
        return self._relative_accuracy

    @property
    def min_index(self) -> int:
        """Index of the lowest bucket (the one ``MIN_VALUE_MS`` and everything below it go to)."""
        return self._min_index

    @property
    def max_index(self) -> int:
        """Index of the highest bucket (the one ``MAX_VALUE_MS`` and everything above it go to)."""
        return self._max_index

    def bucket_index(self, value_ms: float) -> int:
        """Index of the bucket a value (already inside the recordable range) belongs to."""
        return math.ceil(math.log(value_ms) * self._inverse_log_gamma)

    def lower_edge(self, index: int) -> float:
        """Smallest value (exclusive) that can be in bucket ``index``; 0 for the lowest bucket."""
        if index <= self._min_index:
            return 0.0
        return math.exp((index - 1) * self._log_gamma)

    def upper_edge(self, index: int) -> float:
        """Largest value (inclusive) that can be in bucket ``index``; +inf for the top bucket."""
        if index >= self._max_index:
            return math.inf
        return math.exp(index * self._log_gamma)

    def representative(self, index: int) -> float:
        """The value reported for bucket ``index``: ``2 * gamma**i / (gamma + 1)``."""
        return 2.0 * math.exp(index * self._log_gamma) / (self._gamma + 1.0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yield ``(bucket index, count)`` for the non-empty buckets in increasing index order."""
        counts = self._counts
        for index in sorted(counts):
            yield index, counts[index]

    def __len__(self) -> int:
        """Number of non-empty buckets."""
        return len(self._counts)

    # ----------------------------------------------------------------- summaries

    @property
    def count(self) -> int:
        """Number of recorded values."""
        return self._count

    @property
    def sum(self) -> float:
        """Sum of the recorded (clamped) values, in ms."""
        return self._sum

    @property
    def sum_of_squares(self) -> float:
        """Sum of squares of the recorded (clamped) values, in ms^2."""
        return self._sum_of_squares

    def bucket_at_rank(self, rank: int) -> int:
        """Index of the bucket holding order statistic ``rank`` (1-based, 1 <= rank <= count)."""
        if not 1 <= rank <= self._count:
            raise ValueError(f"rank must be in [1, {self._count}], got {rank}")
        cumulative = 0
        for index, bucket_count in self:
            cumulative += bucket_count
            if cumulative >= rank:
                return index
        raise AssertionError("bucket counts do not add up to count")

    def quantile(self, p: float) -> float:
        """Quantile ``p`` in [0, 1] (inverted-CDF definition), within 1% of the exact one."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        if self._count == 0:
            raise ValueError("quantile of an empty histogram")
        rank = max(1, math.ceil(p * self._count))
        return self.representative(self.bucket_at_rank(rank))

    # ----------------------------------------------------------------- merging

    def merge(self, other: LogHistogram) -> None:
        """Add another histogram's counts and sums into this one."""
        if other._relative_accuracy != self._relative_accuracy:
            raise ValueError(
                "cannot merge histograms with different relative accuracy: "
                f"{self._relative_accuracy} and {other._relative_accuracy}"
            )
        counts = self._counts
        for index, bucket_count in other._counts.items():
            counts[index] = counts.get(index, 0) + bucket_count
        self._count += other._count
        self._sum += other._sum
        self._sum_of_squares += other._sum_of_squares

    def __add__(self, other: LogHistogram) -> LogHistogram:
        merged = self.copy()
        merged.merge(other)
        return merged

    def __iadd__(self, other: LogHistogram) -> LogHistogram:
        self.merge(other)
        return self

    def copy(self) -> LogHistogram:
        """An independent copy."""
        duplicate = LogHistogram(self._relative_accuracy)
        duplicate._counts = dict(self._counts)
        duplicate._count = self._count
        duplicate._sum = self._sum
        duplicate._sum_of_squares = self._sum_of_squares
        return duplicate

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LogHistogram):
            return NotImplemented
        return (
            self._relative_accuracy == other._relative_accuracy
            and self._counts == other._counts
            and self._sum == other._sum
            and self._sum_of_squares == other._sum_of_squares
        )

    __hash__ = None  # type: ignore[assignment]  # mutable: equal histograms may diverge later

    def __repr__(self) -> str:
        return (
            f"LogHistogram(a={self._relative_accuracy}, count={self._count}, "
            f"buckets={len(self._counts)})"
        )

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_bucket_counts(
        cls,
        counts: Mapping[int, int],
        *,
        relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
        sum_ms: float = 0.0,
        sum_of_squares: float = 0.0,
    ) -> LogHistogram:
        """Build a histogram from ``{bucket index: count}`` (e.g. counts binned elsewhere).

        ``sum_ms`` and ``sum_of_squares`` are taken as given; pass them when the mean matters.
        """
        histogram = cls(relative_accuracy)
        cleaned: dict[int, int] = {}
        for raw_index, raw_count in counts.items():
            index = int(raw_index)
            bucket_count = int(raw_count)
            if bucket_count < 0:
                raise ValueError(f"negative count {bucket_count} in bucket {index}")
            if not histogram._min_index <= index <= histogram._max_index:
                raise ValueError(
                    f"bucket index {index} outside [{histogram._min_index}, {histogram._max_index}]"
                )
            if bucket_count:
                cleaned[index] = cleaned.get(index, 0) + bucket_count
        histogram._counts = cleaned
        histogram._count = sum(cleaned.values())
        histogram._sum = float(sum_ms)
        histogram._sum_of_squares = float(sum_of_squares)
        return histogram

    # ----------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """The version-1 JSON object (see the module docstring) as a Python dict."""
        runs: list[list[int]] = []
        current: list[int] = []
        previous_index = 0
        for index, bucket_count in self:
            gap = index - previous_index - 1
            if current and gap <= _MAX_ZEROS_IN_RUN:
                current.extend([0] * gap)
                current.append(bucket_count)
            else:
                current = [index, bucket_count]
                runs.append(current)
            previous_index = index
        return {
            "v": FORMAT_VERSION,
            "a": self._relative_accuracy,
            "n": self._count,
            "s": self._sum,
            "q": self._sum_of_squares,
            "b": runs,
        }

    def to_json(self) -> str:
        """Compact version-1 JSON text (see the module docstring)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogHistogram:
        """Parse a version-1 JSON object; raises ``ValueError`` on anything malformed."""
        if data.get("v") != FORMAT_VERSION:
            raise ValueError(f"unsupported histogram format version {data.get('v')!r}")
        try:
            relative_accuracy = float(data["a"])
            declared_count = data["n"]
            runs = data["b"]
            sum_ms = float(data["s"])
            sum_of_squares = float(data["q"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed histogram JSON: {error}") from error
        if not isinstance(runs, list) or not isinstance(declared_count, int):
            raise ValueError("malformed histogram JSON: 'b' must be a list and 'n' an integer")
        counts: dict[int, int] = {}
        previous_end = None
        for run in runs:
            if (
                not isinstance(run, list)
                or len(run) < 2
                or not all(isinstance(item, int) and not isinstance(item, bool) for item in run)
            ):
                raise ValueError(f"malformed histogram run {run!r}")
            first_index = run[0]
            if previous_end is not None and first_index <= previous_end:
                raise ValueError("histogram runs overlap or are out of order")
            for offset, bucket_count in enumerate(run[1:]):
                if bucket_count:
                    counts[first_index + offset] = bucket_count
            previous_end = first_index + len(run) - 2
        histogram = cls.from_bucket_counts(
            counts,
            relative_accuracy=relative_accuracy,
            sum_ms=sum_ms,
            sum_of_squares=sum_of_squares,
        )
        if histogram.count != declared_count:
            raise ValueError(
                f"histogram count {declared_count} does not match its buckets ({histogram.count})"
            )
        return histogram

    @classmethod
    def from_json(cls, text: str | bytes) -> LogHistogram:
        """Parse :meth:`to_json` output; raises ``ValueError`` on anything malformed."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("histogram JSON must be an object")
        return cls.from_dict(data)


def _clamp(value_ms: float) -> float:
    """Map an out-of-range latency into [MIN_VALUE_MS, MAX_VALUE_MS], rejecting invalid ones."""
    if math.isnan(value_ms) or math.isinf(value_ms) or value_ms < 0.0:
        raise ValueError(f"latency must be a finite non-negative number of ms, got {value_ms!r}")
    return MIN_VALUE_MS if value_ms < MIN_VALUE_MS else MAX_VALUE_MS
