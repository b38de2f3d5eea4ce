"""Where inference-log records go: the RecordPublisher role (libs.inference_log's producer fills it)."""

from __future__ import annotations

from typing import Protocol

from infergrid.logging.v1 import logging_pb2


class RecordPublisher(Protocol):
    """Publishes one record without waiting for it (InferenceLogProducer is the Kafka implementation)."""

    def publish(self, record: logging_pb2.InferenceLogRecord) -> None: ...


class DiscardingPublisher:
    """Drops records (inference logging turned off)."""

    def publish(self, record: logging_pb2.InferenceLogRecord) -> None:
        del record
