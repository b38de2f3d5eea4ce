"""The training-set export on small lakes: request-id and as-of joins, future event times, bad input."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from infergrid.logging.v1 import logging_pb2
from services.logging.export import (
    ExportError,
    ExportSummary,
    build_training_set,
    from_record,
    main,
    read_labels,
    read_predictions,
)
from services.logging.lake import ParquetLake

T0 = 1_780_000_000_000_000  # 2026-05-28T20:26:40Z, in µs
S = 1_000_000


def _at(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / S, dt.UTC)


def _iso(us: int) -> str:
    return _at(us).isoformat().replace("+00:00", "Z")


def _record(
    request_id: str,
    at_us: int,
    *,
    user: str = "u1",
    tenant: str = "acme",
    age: float = 40.0,
    event_us: int | None = None,
    status: int = 0,
    cached: bool = False,
) -> logging_pb2.InferenceLogRecord:
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1,
        request_id=request_id,
        tenant=tenant,
        model="toy",
        model_version="1",
        status_code=status,
        cached=cached,
    )
    record.request_time.FromMicroseconds(at_us)
    record.entities["user_id"] = user
    # The model's order, as the gateway writes it: amount (request), user:age (store), hour (request).
    record.features["zz_amount"].float_value = 5.0
    record.features["user:age"].float_value = age
    record.features["hour"].float_value = 3.0
    if event_us is not None:
        record.feature_event_times["user:age"].FromMicroseconds(event_us)
    return record


def _lake(root: Path, records: list[logging_pb2.InferenceLogRecord]) -> Path:
    lake = ParquetLake(root, "log", roll_bytes=1 << 20, roll_seconds=60.0)
    for offset, record in enumerate(records):
        lake.add(0, offset, record, record.SerializeToString())
    lake.flush()
    return root


def _labels(path: Path, columns: dict[str, list[object]]) -> Path:
    table = pa.table(columns)
    if path.suffix == ".csv":
        pa_csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def _export(
    tmp_path: Path, *extra: str, labels: Path, lake: str = "lake"
) -> tuple[int, list[dict[str, object]]]:
    out = tmp_path / "train.parquet"
    argv = ["--lake", str(tmp_path / lake), "--model", "toy", "--labels", str(labels), "--output", str(out)]
    code = main([*argv, *extra])
    return code, pq.read_table(out).to_pylist() if code == 0 else []


def test_labels_by_request_id_get_the_logged_row_in_model_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _lake(
        tmp_path / "lake",
        [
            _record("r1", T0, age=40.0, event_us=T0 - 10 * S),
            _record("r2", T0 + S, age=41.0, event_us=T0 - 5 * S),
            _record("r3", T0 + 2 * S, status=14),  # failed: not a training row
            _record("r4", T0 + 3 * S, cached=True),  # answered from the cache: the model did not run
        ],
    )
    labels = _labels(
        tmp_path / "labels.csv", {"request_id": ["r2", "r1", "r3", "r4", "r9"], "label": [1, 0, 1, 1, 0]}
    )
    code, rows = _export(tmp_path, labels=labels)
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 2 and summary["unmatched_labels"] == 3 and summary["join"] == "request_id"
    assert summary["skipped_failed"] == 1 and summary["skipped_cached"] == 1
    assert [(r["request_id"], r["label"], r["user:age"]) for r in rows] == [("r2", 1, 41.0), ("r1", 0, 40.0)]
    columns = list(pq.read_schema(tmp_path / "train.parquet").names)
    # Ids, entities, label, the features (in the record's wire order: see the last test), event times.
    assert columns[:7] == [
        "request_id",
        "tenant",
        "model",
        "model_version",
        "request_time",
        "user_id",
        "label",
    ]
    assert sorted(columns[7:10]) == ["hour", "user:age", "zz_amount"]
    assert columns[10:] == ["feature_event_times", "degraded_features"]
    assert rows[1]["request_time"] == _at(T0)
    assert rows[1]["feature_event_times"] == [("user:age", _at(T0 - 10 * S))]


def test_as_of_picks_the_latest_prediction_at_or_before_the_label_time() -> None:
    predictions = [
        _record("a", T0 + 100 * S, age=1.0),
        _record("b", T0 + 200 * S, age=2.0),
        _record("c", T0 + 300 * S, age=3.0),
        _record("x", T0 + 150 * S, user="u2", age=9.0),
    ]
    logged = [from_record(r) for r in predictions]
    labels = pa.table(
        {
            "user_id": ["u1", "u1", "u1", "u1", "u2", "u3"],
            "label": [0, 1, 2, 3, 4, 5],
            "label_time": pa.array(
                [T0 + 50 * S, T0 + 100 * S, T0 + 250 * S, T0 + 400 * S, T0 + 149 * S, T0 + 500 * S],
                pa.int64(),
            ).cast(pa.timestamp("us", tz="UTC")),
        }
    )
    summary = ExportSummary()
    table = build_training_set(labels, logged, summary=summary)
    got = {row["label"]: (row["request_id"], row["user:age"]) for row in table.to_pylist()}
    # 0: before every prediction; 1: exactly at one (it counts); 2: between; 3: after all;
    # 4: u2's only prediction is after its label; 5: no prediction of u3.
    assert got == {1: ("a", 1.0), 2: ("b", 2.0), 3: ("c", 3.0)}
    assert summary.join == "as_of" and summary.unmatched_labels == 3
    # Bounded lag: label 3 is 100 s after its prediction.
    bounded = build_training_set(labels, logged, max_lag_us=60 * S)
    assert sorted(bounded.column("label").to_pylist()) == [1, 2]


def test_as_of_never_matches_another_tenants_entity(tmp_path: Path) -> None:
    logged = [
        from_record(_record("a", T0, tenant="acme", age=1.0)),
        from_record(_record("b", T0 + S, tenant="other", age=2.0)),
    ]
    at = pa.array([T0 + 10 * S], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    without = pa.table({"user_id": ["u1"], "label": [1], "label_time": at})
    with pytest.raises(ExportError, match="several tenants"):
        build_training_set(without, logged)
    with_tenant = pa.table({"tenant": ["acme"], "user_id": ["u1"], "label": [1], "label_time": at})
    (row,) = build_training_set(with_tenant, logged).to_pylist()
    assert row["request_id"] == "a" and row["tenant"] == "acme"


def test_rows_with_a_feature_from_after_the_prediction_are_dropped_or_flagged() -> None:
    logged = [
        from_record(_record("ok", T0, event_us=T0 - S)),
        from_record(_record("same", T0 + S, event_us=T0 + S)),  # at the prediction time: not the future
        from_record(_record("future", T0 + 2 * S, event_us=T0 + 3 * S)),
        from_record(_record("unknown", T0 + 3 * S)),  # logged before event times existed
    ]
    labels = pa.table({"request_id": ["ok", "same", "future", "unknown"], "label": [1, 2, 3, 4]})
    summary = ExportSummary()
    dropped = build_training_set(labels, logged, summary=summary)
    assert dropped.column("request_id").to_pylist() == ["ok", "same", "unknown"]
    assert summary.future_rows == 1 and summary.future_features == {"user:age": 1}
    flagged = build_training_set(labels, logged, flag_future=True).to_pylist()
    assert {r["request_id"]: r["future_features"] for r in flagged} == {
        "ok": [],
        "same": [],
        "future": ["user:age"],
        "unknown": [],
    }


def test_a_request_id_of_several_tenants_needs_a_tenant_column() -> None:
    logged = [
        from_record(_record("r", T0, tenant="acme")),
        from_record(_record("r", T0, tenant="other", age=7.0)),
    ]
    with pytest.raises(ExportError, match="request_id 'r' is a prediction of several tenants"):
        build_training_set(pa.table({"request_id": ["r"], "label": [1]}), logged)
    (row,) = build_training_set(
        pa.table({"tenant": ["other"], "request_id": ["r"], "label": [1]}), logged
    ).to_pylist()
    assert row["user:age"] == 7.0


@pytest.mark.parametrize(
    "text",
    ["2026-05-28T20:26:50Z", "2026-05-28T22:26:50+02:00", "2026-05-28T20:26:50", "2026-05-28 20:26:50"],
)
def test_label_times_in_csv_are_read_as_utc(tmp_path: Path, text: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(f"user_id,label,label_time\nu1,1,{text}\n")
    table = read_labels(path, label_column="label", label_time_column="label_time")
    assert table.column("label_time").to_pylist() == [_at(T0 + 10 * S)]


@pytest.mark.parametrize(
    ("labels", "extra", "message"),
    [
        ("labels.txt", (), "expected a .parquet or .csv file"),
        ("missing.csv", (), "no such file"),
        ("nolabel.csv", (), "no column 'label'"),
        ("badtime.csv", (), "column 'label_time' row 1: 'yesterday' is not an ISO 8601 time"),
        ("notime.csv", (), "no column 'label_time'"),
        ("nokeys.csv", (), "need a 'request_id' column or entity key column(s) of the predictions (user_id)"),
        ("byid.csv", ("--max-lag", "soon"), "--max-lag 'soon'"),
        ("clash.csv", (), "column 'hour': a feature and a label share this name"),
    ],
)
def test_bad_input_exits_2_naming_the_file_or_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], labels: str, extra: tuple[str, ...], message: str
) -> None:
    _lake(tmp_path / "lake", [_record("r1", T0)])
    (tmp_path / "labels.txt").write_text("request_id,label\nr1,1\n")
    (tmp_path / "nolabel.csv").write_text("request_id,target\nr1,1\n")
    (tmp_path / "badtime.csv").write_text(f"user_id,label,label_time\nu1,1,{_iso(T0)}\nu1,0,yesterday\n")
    (tmp_path / "notime.csv").write_text("user_id,label\nu1,1\n")
    (tmp_path / "nokeys.csv").write_text(f"account,label,label_time\na,1,{_iso(T0)}\n")
    (tmp_path / "byid.csv").write_text("request_id,label\nr1,1\n")
    (tmp_path / "clash.csv").write_text("request_id,label,hour\nr1,1,5\n")
    code, _ = _export(tmp_path, *extra, labels=tmp_path / labels)
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_empty_lake_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "lake").mkdir()
    labels = _labels(tmp_path / "labels.parquet", {"request_id": ["r"], "label": [1]})
    code, _ = _export(tmp_path, labels=labels)
    assert code == 2 and "no answered predictions of model 'toy'" in capsys.readouterr().err
    code, _ = _export(tmp_path, labels=labels, lake="nope")
    assert code == 2 and "--lake" in capsys.readouterr().err


def test_the_feature_order_is_the_wire_order_of_the_gateways_record(tmp_path: Path) -> None:
    # The gateway writes the features map entry by entry in the model's order; a map parsed into a
    # message forgets it, the export reads it from the bytes.
    order = ["zeta", "amount", "user:age", "hour", "b", "merchant:risk", "a"]
    record = logging_pb2.InferenceLogRecord(request_id="r", model="toy", tenant="acme")
    record.request_time.FromMicroseconds(T0)
    payload = record.SerializeToString()
    for i, name in enumerate(order):
        entry = logging_pb2.InferenceLogRecord()
        entry.features[name].float_value = float(i)
        payload += entry.SerializeToString()
    lake = ParquetLake(tmp_path / "lake", "log", roll_bytes=1 << 20, roll_seconds=60.0)
    lake.add(0, 0, logging_pb2.InferenceLogRecord.FromString(payload), payload)
    lake.flush()
    (logged,) = read_predictions(tmp_path / "lake", model="toy")
    assert list(logged.features) == order
    assert logged.features == {name: float(i) for i, name in enumerate(order)}
