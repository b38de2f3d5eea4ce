"""The Parquet lake: partitioned atomic files, dedupe, roll policy, recovery of uncommitted flushes, read-back."""

from __future__ import annotations

import datetime as dt
import functools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infergrid.logging.v1 import logging_pb2
from services.logging.lake import JOURNAL_DIR, SCHEMA, ParquetLake, lake_files, main, read_table, records

DAY_US = 86_400_000_000
BASE_US = 1_780_000_000_000_000  # 2026-05-28


def _record(i: int, *, model: str = "fraud", day: int = 0) -> tuple[logging_pb2.InferenceLogRecord, bytes]:
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1, request_id=f"req-{i:04d}", model=model, model_version="1"
    )
    record.request_time.FromMicroseconds(BASE_US + day * DAY_US + i)
    record.features["user:age"].double_value = 30.5
    record.outputs["score"].float_value = 0.5
    record.entities["user"] = f"u{i}"
    return record, record.SerializeToString()


_lake = functools.partial(ParquetLake, topic="log", roll_bytes=1 << 20, roll_seconds=60.0)


def test_flush_writes_one_file_per_date_model_and_partition(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    offset = 0
    for model, day, partition in [("fraud", 0, 0), ("fraud", 1, 0), ("churn", 0, 0), ("fraud", 0, 1)]:
        for _ in range(5):
            lake.add(partition, offset, *_record(offset, model=model, day=day))
            offset += 1
    result = lake.flush()
    names = sorted(str(p.relative_to(tmp_path)) for p in result.files)
    assert names == [
        "date=2026-05-28/model=churn/part-log-p0-o00000000000000000010-00000000000000000014.parquet",
        "date=2026-05-28/model=fraud/part-log-p0-o00000000000000000000-00000000000000000004.parquet",
        "date=2026-05-28/model=fraud/part-log-p1-o00000000000000000015-00000000000000000019.parquet",
        "date=2026-05-29/model=fraud/part-log-p0-o00000000000000000005-00000000000000000009.parquet",
    ]
    assert not list(tmp_path.rglob(".*.tmp"))
    assert len(result.journals) == 2
    lake.committed(result)
    assert not list((tmp_path / JOURNAL_DIR).iterdir())
    table = read_table(tmp_path)
    assert table.num_rows == 20
    assert len(lake_files(tmp_path, model="churn")) == 1
    assert read_table(tmp_path, date_from="2026-05-29").num_rows == 5


def test_content_survives_the_round_trip(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    originals = [_record(i) for i in range(3)]
    for i, (record, payload) in enumerate(originals):
        lake.add(0, i, record, payload)
    lake.flush()
    table = read_table(tmp_path, expand_values=True)
    assert records(table) == [r for r, _ in originals]
    row = table.slice(0, 1).to_pylist()[0]
    assert row["entities"] == [("user", "u0")]
    assert json.loads(row["features"]) == {"user:age": 30.5}
    assert row["kafka_offset"] == 0


def test_feature_event_times_are_a_column_and_files_without_it_still_read(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    record, _ = _record(0)
    record.feature_event_times["user:age"].FromMicroseconds(BASE_US - 5_000_000)
    lake.add(0, 0, record, record.SerializeToString())
    (new_file,) = lake.flush().files
    # A file of the schema before the column existed, beside it.
    _, old_payload = _record(1)
    old_table = pq.read_table(new_file).drop_columns(["feature_event_times"])
    old_table = old_table.set_column(
        old_table.schema.get_field_index("record"), "record", pa.array([old_payload], pa.binary())
    ).set_column(old_table.schema.get_field_index("request_id"), "request_id", pa.array(["req-0001"]))
    pq.write_table(
        old_table, new_file.with_name("part-log-p1-o00000000000000000000-00000000000000000000.parquet")
    )
    table = read_table(tmp_path)
    assert table.schema.field("feature_event_times").type == SCHEMA.field("feature_event_times").type
    by_id = {row["request_id"]: row["feature_event_times"] for row in table.to_pylist()}
    assert by_id["req-0001"] is None  # written before the column: unknown
    ((name, when),) = by_id["req-0000"]
    assert name == "user:age"
    assert when == dt.datetime.fromtimestamp((BASE_US - 5_000_000) / 1e6, dt.UTC)


def test_duplicates_are_dropped_in_a_file_and_on_read(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    record, payload = _record(1)
    lake.add(0, 10, record, payload)
    lake.add(0, 11, record, payload)  # redelivered within the same flush
    lake.flush()
    lake.add(0, 50, record, payload)  # sent twice by a producer, in a later flush
    lake.flush()
    assert read_table(tmp_path, dedupe=False).num_rows == 2
    table = read_table(tmp_path)
    assert table.num_rows == 1
    assert table.column("kafka_offset").to_pylist() == [10]


def _of(
    tenant: str, record: logging_pb2.InferenceLogRecord, **changes: str
) -> tuple[logging_pb2.InferenceLogRecord, bytes]:
    copy = logging_pb2.InferenceLogRecord()
    copy.CopyFrom(record)
    for name, value in {"tenant": tenant, **changes}.items():
        setattr(copy, name, value)
    return copy, copy.SerializeToString()


def test_two_tenants_with_one_request_id_are_two_records_in_a_flush_and_on_read(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    record, _ = _record(1)
    lake.add(0, 10, *_of("acme", record))
    lake.add(0, 11, *_of("globex", record, model_version="2"))
    lake.add(0, 12, *_of("acme", record))  # acme's redelivered: the same prediction, kept once
    lake.flush()
    lake.add(0, 40, *_of("globex", record, model_version="2"))  # globex's re-sent in a later flush
    lake.flush()
    assert read_table(tmp_path, dedupe=False).num_rows == 3
    table = read_table(tmp_path)
    pairs = zip(table.column("tenant").to_pylist(), table.column("model_version").to_pylist(), strict=True)
    assert sorted(pairs) == [
        ("acme", "1"),
        ("globex", "2"),
    ]
    only = read_table(tmp_path, tenant="globex")
    assert only.column("tenant").to_pylist() == ["globex"] and only.column("kafka_offset").to_pylist() == [11]


def test_a_reused_id_keeps_the_later_request_time_in_a_flush_and_on_read(tmp_path: Path) -> None:
    later, _ = _record(1)
    later.request_time.FromMicroseconds(later.request_time.ToMicroseconds() + 5)
    earlier, _ = _record(1)
    for root in (tmp_path / "one-flush", tmp_path / "two-flushes"):
        lake = _lake(root)
        lake.add(0, 1, *_of("acme", later, model_version="2"))  # arrived first (re-sent out of order)
        if root.name == "two-flushes":
            lake.flush()
        lake.add(0, 2, *_of("acme", earlier))
        lake.flush()
        table = read_table(root)
        assert table.column("model_version").to_pylist() == ["2"], root.name


def test_rolls_by_size_and_by_age(tmp_path: Path) -> None:
    lake = _lake(tmp_path, roll_bytes=200, roll_seconds=0.0)
    assert not lake.due()
    record, payload = _record(0)
    lake.add(0, 0, record, payload)
    assert lake.due()  # age 0 s reached
    by_size = _lake(tmp_path / "b", roll_bytes=len(payload) * 3, roll_seconds=3600)
    for i in range(3):
        assert not by_size.due()
        by_size.add(0, i, *_record(i))
    assert by_size.due()


def test_files_of_an_uncommitted_flush_are_removed_before_they_are_consumed_again(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    for i in range(10):
        lake.add(0, i, *_record(i))
    lake.committed(lake.flush())  # offsets 0..9 committed
    for i in range(10, 20):
        lake.add(0, i, *_record(i))
    lake.flush()  # crash before the commit: the journal stays
    assert read_table(tmp_path).num_rows == 20

    restarted = _lake(tmp_path)
    assert restarted.reconcile(1, 10) == []  # another partition: untouched
    deleted = restarted.reconcile(0, 10)  # consumption resumes at the committed offset
    assert len(deleted) == 1
    assert read_table(tmp_path).num_rows == 10
    assert not list((tmp_path / JOURNAL_DIR).iterdir())


def test_a_committed_flush_keeps_its_files_when_only_the_journal_deletion_was_lost(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    for i in range(10):
        lake.add(0, i, *_record(i))
    lake.flush()  # committed, then a crash before the journal was deleted
    assert _lake(tmp_path).reconcile(0, 10) == []
    assert read_table(tmp_path).num_rows == 10
    assert not list((tmp_path / JOURNAL_DIR).iterdir())


def test_dropped_partitions_are_not_written(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    lake.add(0, 0, *_record(0))
    lake.add(1, 0, *_record(1))
    lake.drop([0])
    lake.flush()
    assert read_table(tmp_path).column("request_id").to_pylist() == ["req-0001"]


def test_read_command_prints_count_and_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = _lake(tmp_path)
    for i in range(4):
        lake.add(0, i, *_record(i))
    lake.flush()
    assert main(["read", str(tmp_path), "--format", "count"]) == 0
    assert capsys.readouterr().out.strip() == "4"
    assert main(["read", str(tmp_path), "--model", "fraud", "--limit", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["request_id"] for r in lines] == ["req-0000", "req-0001"]
    assert json.loads(lines[0]["outputs"]) == {"score": 0.5}
    output = tmp_path / "out.parquet"
    assert main(["read", str(tmp_path), "--format", "parquet", "--output", str(output)]) == 0
    assert pq.read_table(output).num_rows == 4
