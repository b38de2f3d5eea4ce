"""GetOnlineFeaturesResponse written directly in protobuf wire format from pre-framed values.

Building a response message value by value is slow in Python (bench/results/code-figures.md), and a
call for 100 entities x 32 features has 3,200 values. Records keep
each value already framed as a `FeatureVector.values` entry, so a feature vector
is a join of byte strings. `tests/test_response.py` checks the bytes parse to the
message the slow way would build.
"""

from __future__ import annotations

import numpy as np

from infergrid.features.v1 import features_pb2
from libs.wire import frame, varint
from services.features.codec import (
    EMPTY_TS_FRAME,
    EMPTY_VALUE_FRAME,
    MISSING,
    POSSIBLY_STALE_TAG,
    RESULTS_TAG,
    STATUSES_TAG,
    Record,
)
from services.features.online import ReadResult

PRESENT = features_pb2.FEATURE_STATUS_PRESENT
NOT_FOUND = features_pb2.FEATURE_STATUS_NOT_FOUND
EXPIRED = features_pb2.FEATURE_STATUS_EXPIRED
_PRESENT_B = bytes((PRESENT,))
_POSSIBLY_STALE = POSSIBLY_STALE_TAG + varint(1)
_MIN_EVENT = -(2**63)
# Below this many rows, joining frames is cheaper than building an array.
_MATRIX_MIN_ROWS = 8


def _frame_vector(values: bytes, statuses: bytes, stamps: bytes, n: int) -> bytes:
    return frame(RESULTS_TAG, b"".join((values, STATUSES_TAG, varint(n), statuses, stamps)))


def _slow_vector(recs: list[Record | None], index: int, cutoff: int) -> bytes:
    values: list[bytes] = []
    stamps: list[bytes] = []
    status = bytearray()
    for r in recs:
        if r is None or index >= len(r.events) or r.events[index] == MISSING:
            values.append(EMPTY_VALUE_FRAME)
            stamps.append(EMPTY_TS_FRAME)
            status.append(NOT_FOUND)
        elif r.events[index] < cutoff:
            values.append(EMPTY_VALUE_FRAME)
            stamps.append(r.ts_frames[index])
            status.append(EXPIRED)
        else:
            values.append(r.frames[index])
            stamps.append(r.ts_frames[index])
            status.append(PRESENT)
    return _frame_vector(b"".join(values), bytes(status), b"".join(stamps), len(recs))


class _ViewBlock:
    """The vectors of one view's features when every row is present, complete and fresh."""

    def __init__(self, recs: list[Record]) -> None:
        self._recs = recs
        self._n = len(recs)
        self._statuses = _PRESENT_B * self._n
        # Each row's features share one event time: one timestamp block serves every feature.
        uniform = [r.uniform_ts for r in recs]
        self._stamps = None if None in uniform else b"".join(uniform)  # type: ignore[arg-type]
        width = recs[0].fixed
        features = len(recs[0].events)
        self._matrix: np.ndarray | None = None
        if (
            self._n >= _MATRIX_MIN_ROWS
            and width
            and all(r.fixed == width and len(r.events) == features for r in recs)
        ):
            # Fixed-width frames: read the rows as an (entity, feature, byte) array and take columns in C.
            flat = np.frombuffer(b"".join(r.blob for r in recs), dtype=np.uint8)
            self._matrix = flat.reshape(self._n, features, width).transpose(1, 0, 2)

    def vector(self, index: int) -> bytes:
        if self._matrix is not None:
            values = self._matrix[index].tobytes()
        else:
            values = b"".join([r.frames[index] for r in self._recs])
        stamps = (
            self._stamps if self._stamps is not None else b"".join([r.ts_frames[index] for r in self._recs])
        )
        return _frame_vector(values, self._statuses, stamps, self._n)


def encode(result: ReadResult) -> bytes:
    """The serialized GetOnlineFeaturesResponse for a read."""
    parts: list[bytes] = [result.plan.names_frame]
    blocks: dict[str, _ViewBlock | None] = {}
    cutoffs: dict[str, int] = {}
    for view in result.plan.views:
        recs = result.rows[view.name]
        cutoff = result.now_us - view.ttl_us if view.ttl_us else _MIN_EVENT
        cutoffs[view.name] = cutoff
        fresh = all(r is not None and r.complete and r.min_event >= cutoff for r in recs)
        same_length = fresh and len({len(r.events) for r in recs}) == 1  # type: ignore[union-attr]
        blocks[view.name] = _ViewBlock(recs) if same_length else None  # type: ignore[arg-type]
    for view, index in result.plan.columns:
        block = blocks[view.name]
        if block is not None and index < len(result.rows[view.name][0].events):  # type: ignore[union-attr]
            parts.append(block.vector(index))
        else:
            parts.append(_slow_vector(result.rows[view.name], index, cutoffs[view.name]))
    if result.possibly_stale:
        parts.append(_POSSIBLY_STALE)
    return b"".join(parts)
