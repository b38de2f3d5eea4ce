"""Batch ingestion: load a Parquet or CSV file into a feature view.

    python -m services.features.materialize --view user --file users.parquet [--concurrency 256]

Columns are matched by name: the view's key columns (required), any of its
features, and an optional event-time column (`--timestamp-column`, default
`event_timestamp`; without one, the file's modification time is used). Rows are
written straight to Cassandra with many writes in flight (bounded by
`--concurrency`) and a progress bar; their cache entries are dropped. Each value
is written with its event time as the Cassandra write timestamp, so running the
same file again changes nothing, and an older file never overwrites newer values.
Connection settings come from the service's INFERGRID_FEATURES_* variables.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from cassandra.cluster import NoHostAvailable
from tqdm import tqdm

from libs.config import load_config_or_exit
from services.features import codec
from services.features.config import ENV_PREFIX, FeaturesConfig
from services.features.online import OnlineFeatures
from services.features.registry import View
from services.features.store import WriteRow
from services.features.wiring import open_feature_store

VT = codec.VT
_ARROW_TYPES: dict[int, pa.DataType] = {
    VT.VALUE_TYPE_FLOAT: pa.float32(),
    VT.VALUE_TYPE_DOUBLE: pa.float64(),
    VT.VALUE_TYPE_INT64: pa.int64(),
    VT.VALUE_TYPE_STRING: pa.string(),
    VT.VALUE_TYPE_BYTES: pa.binary(),
    VT.VALUE_TYPE_BOOL: pa.bool_(),
}
WRITE_CHUNK = 200
CHUNK_TIMEOUT_S = 60.0


class MaterializeError(Exception):
    """The file does not fit the view; the message says where and why."""


@dataclasses.dataclass
class Summary:
    rows: int = 0
    values: int = 0


def _batches(
    path: Path, view: View, batch_rows: int
) -> tuple[Iterator[pa.RecordBatch], int | None, list[str]]:
    """Record batches of the file, its row count when known, and its column names."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        parquet = pq.ParquetFile(path)
        return (
            parquet.iter_batches(batch_size=batch_rows),
            parquet.metadata.num_rows,
            parquet.schema_arrow.names,
        )
    if suffix == ".csv":
        # Key and feature columns get the view's types (an id like 00042 must stay a string).
        columns = (*view.key_columns, *zip(view.feature_names, view.feature_types, strict=True))
        types = {name: _ARROW_TYPES[t] for name, t in columns if t in _ARROW_TYPES}
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(block_size=1 << 22),
            convert_options=pa_csv.ConvertOptions(column_types=types),
        )
        return iter(reader), None, reader.schema.names
    raise MaterializeError(f"{path}: unsupported file type {suffix!r} (use .parquet or .csv)")


def _event_times(column: pa.Array | pa.ChunkedArray | None, n: int, default_us: int) -> list[int]:
    if column is None:
        return [default_us] * n
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.timestamp("us", tz=column.type.tz))
        values = column.cast(pa.int64()).to_pylist()
    elif pa.types.is_integer(column.type):
        values = column.to_pylist()  # µs since the epoch
    else:
        raise MaterializeError(
            f"the event time column has type {column.type}; use a timestamp or µs integers"
        )
    return [default_us if v is None else int(v) for v in values]


def convert(
    view: View, batch: pa.RecordBatch, timestamp_column: str, default_us: int, first_row: int
) -> list[WriteRow]:
    """WriteRows for one record batch (null values are skipped; a row with no values is skipped).

    Raises:
        MaterializeError: A key is missing or null, or a value does not fit its feature's type.
    """
    names = batch.schema.names
    n = batch.num_rows
    keys: list[list[bytes]] = []
    for column, value_type in view.key_columns:
        values = batch.column(names.index(column)).to_pylist()
        parts = []
        for i, v in enumerate(values):
            if v is None:
                raise MaterializeError(f"row {first_row + i}: key column {column!r} is null")
            try:
                parts.append(codec.key_part(codec.to_value(value_type, v), value_type) or b"")
            except ValueError as exc:
                raise MaterializeError(f"row {first_row + i}: key column {column!r}: {exc}") from None
        keys.append(parts)
    events = _event_times(
        batch.column(names.index(timestamp_column)) if timestamp_column in names else None, n, default_us
    )
    cells: list[dict[str, bytes]] = [{} for _ in range(n)]
    for name, value_type in zip(view.feature_names, view.feature_types, strict=True):
        if name not in names:
            continue
        for i, v in enumerate(batch.column(names.index(name)).to_pylist()):
            if v is None:
                continue
            try:
                raw = codec.to_value(value_type, v).SerializeToString()
            except ValueError as exc:
                raise MaterializeError(f"row {first_row + i}: feature {name!r}: {exc}") from None
            cells[i][name] = codec.cell(events[i], raw)
    key_rows = keys[0] if len(keys) == 1 else [codec.join_key(p) for p in zip(*keys, strict=True)]
    return [WriteRow(key, c, e) for key, c, e in zip(key_rows, cells, events, strict=True) if c]


def check_columns(view: View, columns: Sequence[str], timestamp_column: str) -> None:
    """Raises MaterializeError naming missing key columns or columns the view does not know."""
    missing = [c for c in view.key_column_names if c not in columns]
    if missing:
        raise MaterializeError(
            f"the file has no key column {', '.join(map(repr, missing))} of view {view.name!r}"
        )
    known = {*view.key_column_names, *view.feature_names, timestamp_column}
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise MaterializeError(
            f"columns {', '.join(map(repr, unknown))} are not features of view {view.name!r}; "
            "apply them to the view first or drop them from the file"
        )
    if not any(c in view.index for c in columns):
        raise MaterializeError(f"the file has no feature of view {view.name!r}")


async def materialize(
    online: OnlineFeatures,
    view: View,
    path: Path,
    *,
    timestamp_column: str = "event_timestamp",
    batch_rows: int = 20_000,
    concurrency: int = 256,
    progress: bool = True,
) -> Summary:
    """Loads `path` into `view` through `online` (store writes + cache invalidation)."""
    batches, total, columns = _batches(path, view, batch_rows)
    check_columns(view, columns, timestamp_column)
    default_us = int(path.stat().st_mtime * 1_000_000)
    summary = Summary()
    # Whole chunks in flight; each chunk's statements are bounded again by the session's max in flight.
    slots = asyncio.Semaphore(max(2, concurrency // 32))

    async def _write(chunk: list[WriteRow]) -> None:
        async with slots:
            await online.write(view, chunk, timeout_s=CHUNK_TIMEOUT_S)

    bar: Any = tqdm(
        total=total, unit="rows", desc=f"{view.name} <- {path.name}", disable=not progress, file=sys.stderr
    )
    try:
        for batch in batches:
            rows = convert(view, batch, timestamp_column, default_us, summary.rows)
            await asyncio.gather(
                *(_write(rows[i : i + WRITE_CHUNK]) for i in range(0, len(rows), WRITE_CHUNK))
            )
            summary.rows += batch.num_rows
            summary.values += sum(len(r.cells) for r in rows)
            bar.update(batch.num_rows)
    finally:
        bar.close()
    return summary


async def _main(args: argparse.Namespace, config: FeaturesConfig) -> int:
    cassandra = dataclasses.replace(config.cassandra, cassandra_max_in_flight=args.concurrency)
    features = open_feature_store(dataclasses.replace(config, cassandra=cassandra))
    try:
        await features.open()
        await features.registry.refresh()
        view = features.registry.lookup(args.view)
        if view is None:
            print(f"error: feature view {args.view!r} does not exist", file=sys.stderr)
            return 1
        started = dt.datetime.now()
        summary = await materialize(
            features.online,
            view,
            args.file,
            timestamp_column=args.timestamp_column,
            concurrency=args.concurrency,
            progress=not args.no_progress,
        )
        seconds = (dt.datetime.now() - started).total_seconds()
        print(
            f"loaded {summary.rows} rows ({summary.values} values) into {view.name} in {seconds:.1f}s "
            f"({summary.rows / max(seconds, 1e-9):.0f} rows/s)"
        )
        return 0
    except MaterializeError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 1
    finally:
        await features.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.features.materialize", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--view", required=True, help="the feature view to load into")
    parser.add_argument("--file", required=True, type=Path, help="a .parquet or .csv file")
    parser.add_argument(
        "--timestamp-column", default="event_timestamp", help="event time column (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=256, help="Cassandra writes in flight (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        parser.error(f"--file {args.file}: no such file")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    config = load_config_or_exit(FeaturesConfig, os.environ, ENV_PREFIX)
    try:
        return asyncio.run(_main(args, config))
    except NoHostAvailable as exc:
        print(f"error: Cassandra cannot be reached: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
