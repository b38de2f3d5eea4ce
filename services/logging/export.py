"""Point-in-time-correct training sets from the inference log: `python -m services.logging.export`.

The log already holds what each model saw: a record's `features` map is the model's input row
(store values after defaults, and the request-time inputs), taken when the prediction was made.
A training set built from it cannot see feature values written later, whatever happened to the
feature store since. This module joins those rows with a labels file:

- labels with a `request_id` column join the prediction of that id (and tenant, when the labels
  have a `tenant` column);
- labels keyed by entity key column(s) (e.g. `user_id`) and a label time join, per label, the latest
  prediction for those entities at or before the label time (an as-of join; `--max-lag` bounds how
  far back).

Only predictions that were answered from the model are used: failed rows (`status_code != 0`) and
answers from the gateway's response cache (`cached`: the model did not run, and the record holds
defaults for the store features) never become training rows. Each row's features are then checked
against their event times (`feature_event_times`): a value whose event time is after the
prediction's request time came from the future of that prediction; such rows are dropped (or kept
and flagged with `--future-features flag`). Records logged before event times existed have none and
are kept (their values are still the ones the model saw).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from infergrid.logging.v1 import logging_pb2
from libs.wire import length_delimited, read_varint
from services.logging import lake

REQUEST_ID = "request_id"
TENANT = "tenant"
_UTC_US = pa.timestamp("us", tz="UTC")
_RECORD_FEATURES_FIELD = 9
# Columns of every training row, before the label's, the entities' and the features'.
_PREDICTION_COLUMNS = ("request_id", "tenant", "model", "model_version", "request_time")
_TRAILING_COLUMNS = ("feature_event_times", "degraded_features", "future_features")


class ExportError(ValueError):
    """Bad input (labels file, its columns, the lake); the message names the file or the column."""


@dataclass(frozen=True, slots=True)
class LoggedPrediction:
    """What the log says one prediction saw: the model's input row and each store value's event time."""

    request_id: str
    tenant: str
    model: str
    model_version: str
    request_time_us: int
    entities: dict[str, str]
    # None where a value was not a number (never written by the gateway, which logs every input as a float).
    features: dict[str, float | None]
    # Microseconds since the epoch, by feature name; only store values have one.
    event_times_us: dict[str, int]
    degraded_features: tuple[str, ...] = ()

    def future_features(self) -> list[str]:
        """Names of the features whose event time is after the prediction (sorted)."""
        return sorted(name for name, us in self.event_times_us.items() if us > self.request_time_us)


@dataclass
class ExportSummary:
    """Counts of one export, printed as JSON by the command."""

    labels: int = 0
    predictions: int = 0
    skipped_failed: int = 0
    skipped_cached: int = 0
    unmatched_labels: int = 0
    future_rows: int = 0
    rows: int = 0
    join: str = ""
    future_features: dict[str, int] = field(default_factory=dict)


def from_record(record: logging_pb2.InferenceLogRecord, order: Sequence[str] = ()) -> LoggedPrediction:
    """The LoggedPrediction of one record (`order`: feature names to put first, e.g. the model's)."""
    names = [n for n in order if n in record.features]
    first = set(names)
    names += sorted(n for n in record.features if n not in first)
    return LoggedPrediction(
        request_id=record.request_id,
        tenant=record.tenant,
        model=record.model,
        model_version=record.model_version,
        request_time_us=record.request_time.ToMicroseconds(),
        entities=dict(record.entities),
        features={n: _number(record.features[n]) for n in names},
        event_times_us={n: t.ToMicroseconds() for n, t in record.feature_event_times.items()},
        degraded_features=tuple(record.degraded_features),
    )


def read_predictions(
    root: Path,
    *,
    model: str,
    tenant: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    summary: ExportSummary | None = None,
) -> list[LoggedPrediction]:
    """The model's answered, uncached predictions in the lake (deduplicated), oldest first.

    Raises:
        ExportError: The lake folder does not exist.
    """
    if not Path(root).is_dir():
        raise ExportError(f"--lake {root}: not a folder")
    table = lake.read_table(root, model=model, tenant=tenant, date_from=date_from, date_to=date_to)
    summary = summary if summary is not None else ExportSummary()
    out: list[LoggedPrediction] = []
    order: list[str] = []
    for payload in table.column("record").to_pylist():
        record = logging_pb2.InferenceLogRecord.FromString(payload)
        if record.status_code != 0:
            summary.skipped_failed += 1
        elif record.cached:
            summary.skipped_cached += 1
        else:
            order = order or _wire_feature_order(payload)
            out.append(from_record(record, order))
    summary.predictions = len(out)
    return out


def read_labels(path: Path, *, label_column: str, label_time_column: str) -> pa.Table:
    """Reads a labels file (Parquet, or CSV with a header); ids and entity keys as strings, times as UTC.

    Naive times (no zone) are read as UTC.

    Raises:
        ExportError: The file cannot be read, or a required column is missing or malformed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ExportError(f"--labels {path}: no such file")
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix == ".csv":
            table = pa_csv.read_csv(path)
        else:
            raise ExportError(f"--labels {path}: expected a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ExportError(f"--labels {path}: cannot be read: {exc}") from None
    if label_column not in table.column_names:
        raise ExportError(
            f"--labels {path}: no column {label_column!r} (the label; columns: {', '.join(table.column_names)})"
        )
    if label_time_column in table.column_names:
        index = table.schema.get_field_index(label_time_column)
        table = table.set_column(
            index, label_time_column, _utc_times(table.column(label_time_column), label_time_column, path)
        )
    return table


def join_by_request_id(
    labels: pa.Table, predictions: Sequence[LoggedPrediction]
) -> list[tuple[int, LoggedPrediction]]:
    """(label row, prediction) pairs: each label joins the prediction of its request id (and tenant).

    Raises:
        ExportError: A request id is empty, or matches predictions of several tenants and the labels
            have no tenant column.
    """
    with_tenant = TENANT in labels.column_names
    by_key: dict[tuple[str, ...], LoggedPrediction] = {}
    tenants_of: dict[str, set[str]] = defaultdict(set)
    for p in predictions:
        by_key[(p.tenant, p.request_id) if with_tenant else (p.request_id,)] = p
        tenants_of[p.request_id].add(p.tenant)
    pairs: list[tuple[int, LoggedPrediction]] = []
    for i, key in enumerate(_label_keys(labels, [REQUEST_ID])):
        request_id = key[-1]
        if not request_id:
            raise ExportError(f"labels row {i}: column {REQUEST_ID!r} is empty")
        if not with_tenant and len(tenants_of.get(request_id, ())) > 1:
            raise ExportError(
                f"labels row {i}: request_id {request_id!r} is a prediction of several tenants "
                f"({', '.join(sorted(tenants_of[request_id]))}): add a {TENANT!r} column or pass --tenant"
            )
        found = by_key.get(key)
        if found is not None:
            pairs.append((i, found))
    return pairs


def join_as_of(
    labels: pa.Table,
    predictions: Sequence[LoggedPrediction],
    *,
    entity_keys: Sequence[str],
    label_time_column: str,
    max_lag_us: int | None = None,
) -> list[tuple[int, LoggedPrediction]]:
    """(label row, prediction) pairs: per label, the latest prediction for its entities at or before its time.

    Ties (two predictions at the same request time) go to the greater request id, so the result does
    not depend on the order of the lake's files.

    Args:
        labels: Entity key columns, a tenant column (optional) and the label time (UTC timestamps).
        predictions: The candidates.
        entity_keys: The label columns to match with the predictions' entity keys.
        label_time_column: The label time.
        max_lag_us: A prediction more than this before the label time does not match (None: any).

    Raises:
        ExportError: A label time is missing.
    """
    with_tenant = TENANT in labels.column_names
    keyed: dict[tuple[str, ...], list[tuple[int, str, LoggedPrediction]]] = defaultdict(list)
    for p in predictions:
        values = tuple(p.entities.get(k, "") for k in entity_keys)
        keyed[(p.tenant, *values) if with_tenant else values].append((p.request_time_us, p.request_id, p))
    times: dict[tuple[str, ...], list[int]] = {}
    for key, rows in keyed.items():
        rows.sort(key=lambda r: (r[0], r[1]))
        times[key] = [r[0] for r in rows]
    label_times = labels.column(label_time_column).cast(pa.int64()).to_pylist()
    pairs: list[tuple[int, LoggedPrediction]] = []
    for i, (at, key) in enumerate(zip(label_times, _label_keys(labels, entity_keys), strict=True)):
        if at is None:
            raise ExportError(f"labels row {i}: column {label_time_column!r} is empty")
        position = bisect.bisect_right(times.get(key, ()), at) - 1  # the last prediction at or before `at`
        if position < 0:
            continue
        request_time_us, _, prediction = keyed[key][position]
        if max_lag_us is not None and at - request_time_us > max_lag_us:
            continue
        pairs.append((i, prediction))
    return pairs


def build_training_set(
    labels: pa.Table,
    predictions: Sequence[LoggedPrediction],
    *,
    label_column: str = "label",
    label_time_column: str = "label_time",
    entity_keys: Sequence[str] | None = None,
    max_lag_us: int | None = None,
    flag_future: bool = False,
    summary: ExportSummary | None = None,
) -> pa.Table:
    """Joins labels to logged predictions and returns the training rows (see the module docstring).

    Args:
        labels: From `read_labels`.
        predictions: From `read_predictions`.
        label_column: The label.
        label_time_column: The label time (required without a request_id column).
        entity_keys: The entity key columns of an as-of join; None: the label columns that are entity
            keys of the predictions.
        max_lag_us: As-of only: the oldest a matched prediction may be, before the label time.
        flag_future: Keep rows with a feature from after the prediction, listed in `future_features`
            (default: drop them).
        summary: Counts of what happened, filled in.

    Returns:
        One row per matched label: the prediction's ids and time, its entities, the label columns, one
        float64 column per feature (the model's order), `feature_event_times`, `degraded_features`, and
        with `flag_future`, `future_features`.

    Raises:
        ExportError: The labels cannot be joined (no request_id nor entity key column, no label time for
            an as-of join, several tenants without a tenant column, a column name clash).
    """
    summary = summary if summary is not None else ExportSummary()
    summary.labels = labels.num_rows
    tenants = {p.tenant for p in predictions}
    if len(tenants) > 1 and TENANT not in labels.column_names and REQUEST_ID not in labels.column_names:
        raise ExportError(
            f"the predictions are of several tenants ({', '.join(sorted(tenants))}): "
            f"add a {TENANT!r} column to the labels or pass --tenant"
        )
    known_keys = sorted({k for p in predictions for k in p.entities})
    if REQUEST_ID in labels.column_names:
        summary.join = "request_id"
        keys: list[str] = []
        pairs = join_by_request_id(labels, predictions)
    else:
        keys = list(entity_keys) if entity_keys else [c for c in labels.column_names if c in known_keys]
        if not keys:
            raise ExportError(
                f"labels: need a {REQUEST_ID!r} column or entity key column(s) of the predictions "
                f"({', '.join(known_keys) or 'none logged'}); columns: {', '.join(labels.column_names)}"
            )
        for key in keys:
            if key not in labels.column_names:
                raise ExportError(f"labels: no entity key column {key!r}")
        if label_time_column not in labels.column_names:
            raise ExportError(
                f"labels: no column {label_time_column!r}: an as-of join by {', '.join(keys)} needs the "
                "label time"
            )
        summary.join = "as_of"
        pairs = join_as_of(
            labels, predictions, entity_keys=keys, label_time_column=label_time_column, max_lag_us=max_lag_us
        )
    summary.unmatched_labels = labels.num_rows - len({i for i, _ in pairs})
    kept: list[tuple[int, LoggedPrediction, list[str]]] = []
    for i, p in pairs:
        future = p.future_features()
        if future:
            summary.future_rows += 1
            for name in future:
                summary.future_features[name] = summary.future_features.get(name, 0) + 1
            if not flag_future:
                continue
        kept.append((i, p, future))
    summary.rows = len(kept)
    return _table(
        labels, kept, keys, label_column=label_column, flag_future=flag_future, predictions=predictions
    )


def _table(
    labels: pa.Table,
    kept: Sequence[tuple[int, LoggedPrediction, list[str]]],
    keys: Sequence[str],
    *,
    label_column: str,
    flag_future: bool,
    predictions: Sequence[LoggedPrediction],
) -> pa.Table:
    rows = [p for _, p, _ in kept]
    entity_names = list(keys) or sorted({k for p in (rows or predictions) for k in p.entities})
    feature_names = _feature_names(rows or predictions)
    # The logged entities and ids stand for the labels' own columns of those names.
    label_names = [c for c in labels.column_names if c not in (*entity_names, REQUEST_ID, TENANT)]
    if label_column in label_names:  # the label first
        label_names.remove(label_column)
        label_names.insert(0, label_column)
    trailing = list(_TRAILING_COLUMNS if flag_future else _TRAILING_COLUMNS[:-1])
    seen: dict[str, str] = {}
    for kind, names in (
        ("prediction", _PREDICTION_COLUMNS),
        ("entity key", entity_names),
        ("label", label_names),
        ("feature", feature_names),
        ("export", trailing),
    ):
        for name in names:
            if name in seen:
                raise ExportError(
                    f"column {name!r}: a {kind} and a {seen[name]} share this name; rename the labels' column"
                )
            seen[name] = kind
    take = pa.array([i for i, _, _ in kept], pa.int64())
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        name: pa.array([getattr(p, name) for p in rows], pa.string()) for name in _PREDICTION_COLUMNS[:4]
    }
    columns["request_time"] = pa.array([p.request_time_us for p in rows], pa.int64()).cast(_UTC_US)
    for name in entity_names:
        columns[name] = pa.array([p.entities.get(name) for p in rows], pa.string())
    for name in label_names:
        columns[name] = labels.column(name).take(take)
    for name in feature_names:
        columns[name] = pa.array([p.features.get(name) for p in rows], pa.float64())
    columns["feature_event_times"] = pa.array(
        [list(p.event_times_us.items()) for p in rows], pa.map_(pa.string(), pa.int64())
    ).cast(pa.map_(pa.string(), _UTC_US))
    columns["degraded_features"] = pa.array([list(p.degraded_features) for p in rows], pa.list_(pa.string()))
    if flag_future:
        columns["future_features"] = pa.array([future for _, _, future in kept], pa.list_(pa.string()))
    return pa.table(columns)


def _feature_names(predictions: Iterable[LoggedPrediction]) -> list[str]:
    return list(dict.fromkeys(name for p in predictions for name in p.features))


def _number(value: Any) -> float | None:
    kind = value.WhichOneof("kind")
    if kind in ("float_value", "double_value", "int64_value", "bool_value"):
        return float(getattr(value, kind))
    return None


def _label_keys(labels: pa.Table, columns: Sequence[str]) -> list[tuple[str, ...]]:
    """Each label row's key: its tenant (where the labels have that column), then `columns`."""
    names = [TENANT, *columns] if TENANT in labels.column_names else columns
    return list(zip(*(_strings(labels, name) for name in names), strict=True))


def _strings(table: pa.Table, name: str) -> list[str]:
    """A column as strings (ids and entity keys may have been read as numbers); None becomes ""."""
    column = table.column(name)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = column.cast(pa.string())
    return ["" if v is None else v for v in column.to_pylist()]


def _utc_times(column: pa.ChunkedArray, name: str, path: Path) -> pa.ChunkedArray:
    """A time column as timestamp[us, UTC]; strings are ISO 8601, with or without an offset (then UTC)."""
    kind = column.type
    if pa.types.is_timestamp(kind) and kind.tz is not None:
        return column.cast(_UTC_US)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):  # naive: the values are already UTC wall clock
        return column.cast(pa.timestamp("us")).cast(_UTC_US)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        for as_read in (_UTC_US, pa.timestamp("us")):  # every text with an offset, then every one without
            with contextlib.suppress(pa.ArrowInvalid):
                return column.cast(as_read).cast(_UTC_US)
        for i, text in enumerate(column.to_pylist()):
            try:
                pc.cast(pa.array([text]), pa.timestamp("us"))
            except pa.ArrowInvalid:
                try:
                    pc.cast(pa.array([text]), _UTC_US)
                except pa.ArrowInvalid:
                    raise ExportError(
                        f"--labels {path}: column {name!r} row {i}: {text!r} is not an ISO 8601 time"
                    ) from None
        raise ExportError(f"--labels {path}: column {name!r}: mixes times with and without a zone offset")
    raise ExportError(
        f"--labels {path}: column {name!r}: expected times (ISO 8601 text or timestamps), got {kind}"
    )


def _wire_feature_order(payload: bytes) -> list[str]:
    """The feature names of a serialized record in wire order: the gateway writes them in the model's order."""
    names: list[str] = []
    with contextlib.suppress(IndexError, ValueError, UnicodeDecodeError):  # damaged: the names read so far
        for number, position, _ in length_delimited(payload):
            if number == _RECORD_FEATURES_FIELD and payload[position] == 0x0A:  # entry.key comes first
                size, start = read_varint(payload, position + 1)
                names.append(payload[start : start + size].decode())
    return names


def _duration_us(text: str) -> int:
    """`90s`, `15m`, `6h`, `7d` (or plain seconds) in microseconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    text = text.strip().lower()
    scale = units.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise ExportError(f"--max-lag {text!r}: expected a duration such as 90s, 15m, 6h or 7d") from None
    if seconds < 0:
        raise ExportError(f"--max-lag {text!r}: must not be negative")
    return int(seconds * 1_000_000)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.logging.export --lake DIR --model M --labels FILE --output FILE [options]`."""
    parser = argparse.ArgumentParser(
        prog="python -m services.logging.export", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--lake", type=Path, required=True, help="the Parquet lake folder")
    parser.add_argument("--model", required=True, help="the model whose predictions to use")
    parser.add_argument("--labels", type=Path, required=True, help="labels, .parquet or .csv")
    parser.add_argument("--output", type=Path, required=True, help="the training set to write (.parquet)")
    lake.add_filters(parser)
    parser.add_argument("--label-column", default="label", help="the label (default: label)")
    parser.add_argument(
        "--label-time-column", default="label_time", help="the label time (default: label_time)"
    )
    parser.add_argument(
        "--entity-keys", help="comma-separated entity key columns of an as-of join (default: found ones)"
    )
    parser.add_argument(
        "--max-lag", help="as-of: ignore predictions older than this before the label (7d, 6h)"
    )
    parser.add_argument(
        "--future-features",
        choices=("drop", "flag"),
        default="drop",
        help="rows with a feature value from after the prediction: drop (default) or keep and list them",
    )
    args = parser.parse_args(argv)
    summary = ExportSummary()
    try:
        max_lag = _duration_us(args.max_lag) if args.max_lag else None
        labels = read_labels(
            args.labels, label_column=args.label_column, label_time_column=args.label_time_column
        )
        predictions = read_predictions(args.lake, **lake.filters(args), summary=summary)
        if not predictions:
            raise ExportError(
                f"--lake {args.lake}: no answered predictions of model {args.model!r} (with these filters)"
            )
        table = build_training_set(
            labels,
            predictions,
            label_column=args.label_column,
            label_time_column=args.label_time_column,
            entity_keys=[k.strip() for k in (args.entity_keys or "").split(",") if k.strip()] or None,
            max_lag_us=max_lag,
            flag_future=args.future_features == "flag",
            summary=summary,
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temp = args.output.with_name(f".{args.output.name}.tmp")
    pq.write_table(table, temp, compression="zstd")
    temp.replace(args.output)
    print(json.dumps({"output": str(args.output), **summary.__dict__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
