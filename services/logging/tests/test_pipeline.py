"""Pieces of the consumer pipeline that need no Kafka: the sampled-flag test on W3C traceparent headers."""

from __future__ import annotations

import pytest

from services.logging.pipeline import _sampled

TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"


@pytest.mark.parametrize(
    ("header", "sampled"),
    [
        (TRACE + b"-01", True),
        (TRACE + b"-03", True),  # sampled + random (W3C trace context level 2)
        (TRACE + b"-00", False),
        (TRACE + b"-02", False),
        (TRACE + b"-zz", False),
        (b"00-short-01", False),
        (None, False),
    ],
)
def test_sampled_flag(header: bytes | None, sampled: bool) -> None:
    assert _sampled(header) is sampled
