"""What a feature write may carry: event times within the store's range and finite numbers.

Every write path (WriteFeatures, the stream ingester) checks rows here before
anything reaches Cassandra, so a client's bad write is INVALID_ARGUMENT naming the
field and never a store error (which would count against the store's breaker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from infergrid.types.v1 import value_pb2
from services.features.errors import InvalidArgument

# Cassandra's write timestamp is a signed 64-bit count of microseconds (Long.MIN_VALUE is refused);
# the event time is also packed as ">q" into every cell. Client values are checked against far
# tighter bounds (see EventTimeBounds); these are the last line.
MAX_STORE_US = 2**63 - 1
MIN_STORE_US = -(2**63) + 1
_NANOS = 1_000_000_000


def timestamp_us(where: str, ts: Any) -> int:
    """Microseconds since the epoch of a `google.protobuf.Timestamp`.

    Args:
        where: The field, for the error (`rows[2].event_timestamp`).
        ts: The Timestamp.

    Raises:
        InvalidArgument: `nanos` is outside 0..999,999,999 (the Timestamp is malformed).
    """
    if not 0 <= ts.nanos < _NANOS:
        raise InvalidArgument(f"{where}: nanos must be within 0..999999999, got {ts.nanos}")
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


@dataclass(frozen=True)
class EventTimeBounds:
    """Event times a write may carry: not before `min_us`, at most `max_skew_us` after now."""

    min_us: int
    max_skew_us: int

    def check(self, where: str, event_us: int, now_us: int) -> None:
        """Refuses an event time outside the bounds.

        Raises:
            InvalidArgument: Names `where` and the bound crossed.
        """
        if event_us < max(self.min_us, MIN_STORE_US):
            raise InvalidArgument(
                f"{where}: {_describe(event_us)} is before the earliest accepted event time "
                f"({_describe(self.min_us)})"
            )
        if event_us > min(now_us + self.max_skew_us, MAX_STORE_US):
            raise InvalidArgument(
                f"{where}: {_describe(event_us)} is in the future (more than "
                f"{self.max_skew_us / 1e6:g} s after the server's clock)"
            )


def _describe(us: int) -> str:
    """A time for an error message: ISO 8601 where it is one, else the microseconds."""
    seconds = us // 1_000_000
    if -62_135_596_800 <= seconds <= 253_402_300_799:  # 0001-01-01 .. 9999-12-31
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{us} µs since the epoch"


def non_finite(value: value_pb2.Value) -> str | None:
    """Where a value holds NaN or ±Inf ('' for the scalar, '[3]' for a list element), or None."""
    kind = value.WhichOneof("kind")
    if kind in ("float_value", "double_value"):
        number = getattr(value, kind)
        return None if math.isfinite(number) else ""
    if kind in ("float_list_value", "double_list_value"):
        values = getattr(value, kind).values
        if all(map(math.isfinite, values)):
            return None
        for i, number in enumerate(values):
            if not math.isfinite(number):
                return f"[{i}]"
    return None
