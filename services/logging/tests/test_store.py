"""The Cassandra store's batching: every statement kept, in order, in batches under Cassandra's limits."""

from __future__ import annotations

from typing import Any

from services.logging.store import MAX_BATCH_BYTES, MAX_BATCH_STATEMENTS, _chunks


def test_chunks_keep_every_statement_in_order_under_the_limits() -> None:
    statement: Any = object()
    params = [("t", f"req-{i}", "fraud", "1", i, b"x" * (100 + i % 900), 0, i) for i in range(2000)]
    chunks = _chunks([(statement, p) for p in params])
    assert [p for chunk in chunks for _, p in chunk] == params
    for chunk in chunks:
        assert len(chunk) <= MAX_BATCH_STATEMENTS
        assert sum(len(p[-3]) for _, p in chunk) <= MAX_BATCH_BYTES


def test_one_oversized_statement_still_gets_a_batch_of_its_own() -> None:
    statement: Any = object()
    big = ("t", "req", "fraud", "1", 0, b"x" * (MAX_BATCH_BYTES * 2), 0, 0)
    small = ("t", "a", "fraud", "1", 0, b"x", 0, 0)
    assert _chunks([(statement, small), (statement, big)]) == [
        [(statement, small)],
        [(statement, big)],
    ]
