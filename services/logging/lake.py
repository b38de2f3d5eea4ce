"""The Parquet data lake of inference-log records, and `python -m services.logging.lake read` to read it back.

Layout: `<root>/date=YYYY-MM-DD/model=<model>/part-<topic>-p<partition>-o<first>-<last>.parquet`,
one file per (request date, model, Kafka partition) per flush, named by the Kafka
offsets it holds. A flush writes every buffered record at once ("rolled" when the
buffer reaches `roll_bytes` or its oldest record `roll_seconds`), each file as
a temporary dot-file, fsynced, then renamed into place, so readers never see a
half-written file.

Exactly once per record, given at-least-once delivery from Kafka. A record is
identified by (tenant, request_id): two tenants' records with the same request id
are two records; the same tenant's id twice is one prediction logged twice, kept
once (when the two differ — a caller reused its id — the later request_time wins,
the rule Cassandra's write timestamps apply too, see services/logging/store.py).
1. Within a flush, records are deduplicated by (tenant, request_id) (a file never
   holds a request twice).
2. Offsets are committed only after the flush's files are renamed. Before the
   renames, a journal `_journal/<topic>-p<partition>-<first>.json` lists the
   files of the flush and their offset range; it is deleted after the commit.
3. When a consumer (this one after a restart, or another after a rebalance)
   receives the first message of a partition, any journal of that partition whose
   range reaches that offset belongs to a flush whose commit never happened: its
   files are deleted, because those records are about to be consumed and written
   again. A journal entirely below that offset was committed: only the journal
   goes.
4. A record the *producer* sent twice (a delivery that timed out but had landed,
   then re-sent from its spool) arrives at two offsets and may be written in two
   flushes; `read_table` (and the `read` command) therefore deduplicates by
   (tenant, request_id), keeping the latest request_time, then the earliest
   (partition, offset). The lake read through it holds each record exactly once.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from infergrid.logging.v1 import logging_pb2
from infergrid.types.v1 import value_pb2
from libs.spool import fsync_path

JOURNAL_DIR = "_journal"

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("request_time", pa.timestamp("us", tz="UTC")),
        ("response_time", pa.timestamp("us", tz="UTC")),
        ("tenant", pa.string()),
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("latency_us", pa.int64()),
        ("status_code", pa.int32()),
        ("error_message", pa.string()),
        ("degraded", pa.bool_()),
        ("degraded_features", pa.list_(pa.string())),
        ("cached", pa.bool_()),
        ("trace_id", pa.string()),
        ("span_id", pa.string()),
        ("entities", pa.map_(pa.string(), pa.string())),
        # The event time of each store feature value used, by feature name (the record's
        # feature_event_times): what point-in-time exports check. Null in files written before it existed.
        ("feature_event_times", pa.map_(pa.string(), pa.timestamp("us", tz="UTC"))),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
        # The whole serialized InferenceLogRecord: the lossless source of truth; its typed maps
        # (features, request_inputs, outputs, shadow) are expanded at read time (`read_table(expand=True)`),
        # which keeps the consumer's cost per record low.
        ("record", pa.binary()),
    ]
)


@dataclass
class _Group:
    """Buffered records of one (date, model, Kafka partition)."""

    first_offset: int
    last_offset: int = -1
    rows: list[tuple[int, logging_pb2.InferenceLogRecord, bytes]] = field(default_factory=list)
    # (tenant, request_id) -> index in rows.
    request_ids: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class FlushResult:
    """Files a flush made visible and the journals to delete once its offsets are committed."""

    files: list[Path]
    journals: list[Path]


class ParquetLake:
    """Buffers records and writes them as Parquet files (format and guarantees: module docstring)."""

    def __init__(self, root: Path, topic: str, *, roll_bytes: int, roll_seconds: float) -> None:
        """Opens (creating) the lake folder; nothing is buffered yet."""
        self.root = Path(root)
        self.topic = topic
        self.roll_bytes = roll_bytes
        self.roll_seconds = roll_seconds
        (self.root / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
        self._groups: dict[tuple[str, str, int], _Group] = {}
        self._bytes = 0
        self._oldest: float | None = None

    @property
    def buffered_bytes(self) -> int:
        """Serialized bytes waiting for the next flush."""
        return self._bytes

    def add(
        self, partition: int, offset: int, record: logging_pb2.InferenceLogRecord, payload: bytes
    ) -> None:
        """Buffers one record; a (tenant, request) already buffered in the group is kept once (later time wins)."""
        date = _date(record.request_time.seconds // 86_400)
        key = (date, record.model, partition)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(first_offset=offset)
        group.last_offset = max(group.last_offset, offset)
        ident = (record.tenant, record.request_id)
        index = group.request_ids.get(ident)
        if index is not None:
            _, known, known_payload = group.rows[index]
            if record.request_time.ToMicroseconds() > known.request_time.ToMicroseconds():
                group.rows[index] = (offset, record, payload)
                self._bytes += len(payload) - len(known_payload)
            return
        group.request_ids[ident] = len(group.rows)
        group.rows.append((offset, record, payload))
        self._bytes += len(payload)
        if self._oldest is None:
            self._oldest = time.monotonic()

    def due(self) -> bool:
        """True when the buffer should be rolled into files (size or age)."""
        if self._bytes >= self.roll_bytes:
            return True
        return self._oldest is not None and time.monotonic() - self._oldest >= self.roll_seconds

    def drop(self, partitions: Sequence[int]) -> None:
        """Forgets buffered records of partitions this consumer no longer owns (they will be redelivered)."""
        gone = set(partitions)
        for key in [k for k in self._groups if k[2] in gone]:
            group = self._groups.pop(key)
            self._bytes -= sum(len(p) for _, _, p in group.rows)
        if not self._groups:
            self._bytes, self._oldest = 0, None

    def flush(self) -> FlushResult:
        """Writes every buffered group to its file (temp, fsync, journal, rename); empties the buffer."""
        if not self._groups:
            return FlushResult([], [])
        staged: list[tuple[Path, Path]] = []
        ranges: dict[int, list[int]] = {}
        files_by_partition: dict[int, list[str]] = {}
        for (date, model, partition), group in sorted(self._groups.items()):
            final = (
                self.root
                / f"date={date}"
                / f"model={model}"
                / f"part-{self.topic}-p{partition}-o{group.first_offset:020d}-{group.last_offset:020d}.parquet"
            )
            final.parent.mkdir(parents=True, exist_ok=True)
            temp = final.with_name(f".{final.name}.tmp")
            pq.write_table(_to_table(group.rows, partition), temp, compression="zstd")
            fsync_path(temp)
            staged.append((temp, final))
            span = ranges.setdefault(partition, [group.first_offset, group.last_offset])
            span[0], span[1] = min(span[0], group.first_offset), max(span[1], group.last_offset)
            files_by_partition.setdefault(partition, []).append(str(final.relative_to(self.root)))
        journals = []
        for partition, (first, last) in ranges.items():
            journal = self.root / JOURNAL_DIR / f"{self.topic}-p{partition}-{first:020d}.json"
            body = {
                "partition": partition,
                "first": first,
                "last": last,
                "files": files_by_partition[partition],
            }
            temp_journal = journal.with_name(f".{journal.name}.tmp")
            temp_journal.write_text(json.dumps(body))
            fsync_path(temp_journal)
            os.replace(temp_journal, journal)
            journals.append(journal)
        fsync_path(self.root / JOURNAL_DIR)
        for temp, final in staged:
            os.replace(temp, final)
        for directory in {final.parent for _, final in staged}:
            fsync_path(directory)
        self._groups.clear()
        self._bytes, self._oldest = 0, None
        return FlushResult([final for _, final in staged], journals)

    def committed(self, result: FlushResult) -> None:
        """Deletes the journals of a flush whose offsets are committed."""
        for journal in result.journals:
            journal.unlink(missing_ok=True)

    def reconcile(self, partition: int, first_offset: int) -> list[Path]:
        """Before consuming `partition` from `first_offset`: deletes files of flushes that were never committed.

        Returns:
            The data files deleted.
        """
        deleted: list[Path] = []
        for journal in sorted((self.root / JOURNAL_DIR).glob(f"{self.topic}-p{partition}-*.json")):
            try:
                body = json.loads(journal.read_text())
            except (OSError, ValueError):
                continue  # a torn journal: its rename never happened, so neither did the files' renames
            if body.get("partition") != partition:
                continue
            if first_offset <= int(body["last"]):
                for name in body["files"]:
                    path = self.root / name
                    if path.exists():
                        path.unlink()
                        deleted.append(path)
            journal.unlink(missing_ok=True)
        return deleted


@functools.lru_cache(maxsize=1024)
def _date(day: int) -> str:
    """The date (YYYY-MM-DD) of a day number (days since 1970-01-01, UTC)."""
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


def _value(value: value_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    item = getattr(value, kind)
    if kind.endswith("_list_value"):
        return list(item.values)
    if kind == "bytes_value":
        return base64.b64encode(item).decode()
    return item


def _values_json(values: Any) -> str:
    return json.dumps({k: _value(v) for k, v in values.items()}, separators=(",", ":"))


def _to_table(rows: list[tuple[int, logging_pb2.InferenceLogRecord, bytes]], partition: int) -> pa.Table:
    records = [r for _, r, _ in rows]
    columns: dict[str, Any] = {
        "request_id": [r.request_id for r in records],
        "request_time": [r.request_time.ToMicroseconds() for r in records],
        "response_time": [
            r.response_time.ToMicroseconds() if r.HasField("response_time") else None for r in records
        ],
        "tenant": [r.tenant for r in records],
        "model": [r.model for r in records],
        "model_version": [r.model_version for r in records],
        "latency_us": [r.latency_us for r in records],
        "status_code": [r.status_code for r in records],
        "error_message": [r.error_message for r in records],
        "degraded": [r.degraded for r in records],
        "degraded_features": [list(r.degraded_features) or None for r in records],
        "cached": [r.cached for r in records],
        "trace_id": [r.trace_id for r in records],
        "span_id": [r.span_id for r in records],
        "entities": [list(r.entities.items()) for r in records],
        "feature_event_times": [
            [(k, t.seconds * 1_000_000 + t.nanos // 1000) for k, t in r.feature_event_times.items()]
            for r in records
        ],
        "kafka_partition": pa.array([partition] * len(rows), pa.int32()),
        "kafka_offset": [offset for offset, _, _ in rows],
        "record": [payload for _, _, payload in rows],
    }
    return pa.table(columns, schema=SCHEMA)


def _shadow_json(record: logging_pb2.InferenceLogRecord) -> str | None:
    if not record.HasField("shadow"):
        return None
    shadow = record.shadow
    body = {
        "model_version": shadow.model_version,
        "outputs": {k: _value(v) for k, v in shadow.outputs.items()},
        "latency_us": shadow.latency_us,
        "status_code": shadow.status_code,
    }
    return json.dumps(body, separators=(",", ":"))


def expand(table: pa.Table) -> pa.Table:
    """Adds the typed maps of each record (features, request_inputs, outputs, shadow) as JSON columns."""
    parsed = records(table)
    for name in ("features", "request_inputs", "outputs"):
        values = [_values_json(getattr(r, name)) for r in parsed]
        table = table.append_column(name, pa.array(values, pa.string()))
    return table.append_column("shadow", pa.array([_shadow_json(r) for r in parsed], pa.string()))


def lake_files(
    root: Path, *, model: str | None = None, date_from: str | None = None, date_to: str | None = None
) -> list[Path]:
    """The lake's data files (no temporary ones), optionally for one model and a date range (inclusive)."""
    files = []
    for path in sorted(Path(root).glob("date=*/model=*/part-*.parquet")):
        date = path.parent.parent.name.removeprefix("date=")
        if model is not None and path.parent.name != f"model={model}":
            continue
        if (date_from and date < date_from) or (date_to and date > date_to):
            continue
        files.append(path)
    return files


def read_table(
    root: Path,
    *,
    model: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    tenant: str | None = None,
    dedupe: bool = True,
    expand_values: bool = False,
) -> pa.Table:
    """Reads the lake (or a model's / a date range's part of it) into one Arrow table.

    Args:
        root: The lake folder.
        model: Only this model.
        date_from: First request date, YYYY-MM-DD.
        date_to: Last request date, YYYY-MM-DD.
        tenant: Only this tenant's records.
        dedupe: Keep one row per (tenant, request_id) (the latest request_time, then the earliest
            partition/offset), as the module docstring explains.
        expand_values: Add features, request_inputs, outputs and shadow as JSON columns (see `expand`).

    Returns:
        The rows, ordered by request_time then request_id.
    """
    files = lake_files(root, model=model, date_from=date_from, date_to=date_to)
    if not files:
        return SCHEMA.empty_table()
    # One scan over the files, batch by batch, keeping only the tenant's rows (files written before a
    # column existed read it as null).
    dataset = ds.dataset([str(f) for f in files], schema=SCHEMA, format="parquet")
    table = dataset.to_table(filter=ds.field("tenant") == tenant if tenant is not None else None)
    if dedupe and table.num_rows:
        table = table.sort_by(
            [("request_time", "descending"), ("kafka_partition", "ascending"), ("kafka_offset", "ascending")]
        )
        indexed = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
        first = indexed.group_by(["tenant", "request_id"], use_threads=False).aggregate([("_row", "min")])
        table = table.take(first["_row_min"])
    table = table.sort_by([("request_time", "ascending"), ("request_id", "ascending")])
    return expand(table) if expand_values else table


def records(table: pa.Table) -> list[logging_pb2.InferenceLogRecord]:
    """The InferenceLogRecords of a table read from the lake."""
    return [logging_pb2.InferenceLogRecord.FromString(b) for b in table.column("record").to_pylist()]


def add_filters(parser: argparse.ArgumentParser) -> None:
    """The options that pick a part of the lake besides the model (`filters` reads them back)."""
    parser.add_argument("--from", dest="date_from", help="first request date, YYYY-MM-DD")
    parser.add_argument("--to", dest="date_to", help="last request date, YYYY-MM-DD")
    parser.add_argument("--tenant", help="only this tenant's records")


def filters(args: argparse.Namespace) -> dict[str, Any]:
    """The `read_table` filters of parsed options (`--model` and those of `add_filters`)."""
    return {"model": args.model, "tenant": args.tenant, "date_from": args.date_from, "date_to": args.date_to}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.logging.lake read LAKE_DIR [--model M] [--from D] [--to D] [--format F]`."""
    parser = argparse.ArgumentParser(
        prog="python -m services.logging.lake", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    read = commands.add_parser("read", help="read records back (deduplicated by tenant and request_id)")
    read.add_argument("lake_dir", type=Path)
    read.add_argument("--model")
    add_filters(read)
    read.add_argument("--format", choices=("jsonl", "count", "parquet"), default="jsonl")
    read.add_argument("--output", type=Path, help="with --format parquet: the file to write")
    read.add_argument("--limit", type=int, default=0, help="at most this many rows (jsonl)")
    read.add_argument("--raw", action="store_true", help="do not deduplicate by tenant and request_id")
    args = parser.parse_args(argv)
    table = read_table(
        args.lake_dir, **filters(args), dedupe=not args.raw, expand_values=args.format == "jsonl"
    )
    if args.format == "count":
        print(table.num_rows)
    elif args.format == "parquet":
        if args.output is None:
            parser.error("--format parquet needs --output")
        pq.write_table(table, args.output)
        print(f"{table.num_rows} rows -> {args.output}")
    else:
        rows = table.drop_columns(["record"])
        if args.limit:
            rows = rows.slice(0, args.limit)
        for row in rows.to_pylist():
            print(json.dumps(row, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
