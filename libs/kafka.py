"""Kafka settings shared by producers and consumers, and W3C trace context in record headers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.propagate import extract

from libs.config import secret

# The local stack's brokers (stack/kafka.py): SCRAM over plaintext on loopback.
SASL_PROTOCOL = "SASL_PLAINTEXT"
SASL_MECHANISM = "SCRAM-SHA-512"


@dataclass(frozen=True)
class KafkaConfig:
    """Where Kafka is and who the client is; read with the service's prefix + KAFKA_*.

    With a SASL protocol the password is best given as a file (`KAFKA_SASL_PASSWORD_FILE`); librdkafka
    never prints it (its debug output redacts `sasl.password`), nor does `libs.config.redacted`.
    """

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_client_id: str = "infergrid"
    # PLAINTEXT (no authentication), SASL_PLAINTEXT (the local stack, the Kubernetes manifests) or SASL_SSL.
    kafka_security_protocol: str = "PLAINTEXT"
    # SCRAM-SHA-512 (the stack's and the Kubernetes manifests' brokers), SCRAM-SHA-256 or PLAIN.
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = secret("")

    def client_conf(self) -> dict[str, Any]:
        """The librdkafka settings every client needs (connection and security); they hold the password."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "client.id": self.kafka_client_id,
            "security.protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username
            conf["sasl.password"] = self.kafka_sasl_password
        return conf


def context_from_headers(headers: Sequence[tuple[str, bytes | None]] | None) -> otel_context.Context:
    """The trace context a producer put in a record's headers (an empty one when there is none)."""
    carrier = {key: value.decode(errors="replace") for key, value in headers or () if value is not None}
    return extract(carrier)


def header(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> str | None:
    """The value of header `name`, decoded, or None."""
    return next((v.decode(errors="replace") for k, v in headers or () if k == name and v is not None), None)
