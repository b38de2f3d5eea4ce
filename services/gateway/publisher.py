"""Where inference-log records go: the RecordPublisher role (libs.inference_log's producer fills it)."""

from __future__ import annotations

from typing import Protocol

from infergrid.logging.v1 import logging_pb2


class RecordPublisher(Protocol):
    """Writes one record durably before the prediction is answered (InferenceLogProducer: disk log, then Kafka).

    `write` returns once the record survives the death of this process; concurrent calls may share
    one disk write. It raises (any exception, e.g. OSError for a full disk) when the record could not
    be kept: the caller then fails the request instead of answering it.
    """

    async def write(self, record: logging_pb2.InferenceLogRecord) -> None: ...


class DiscardingPublisher:
    """Drops records (inference logging turned off)."""

    async def write(self, record: logging_pb2.InferenceLogRecord) -> None:
        del record
