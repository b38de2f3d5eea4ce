"""Kafka 4.x: kafka_2.13 and a log4j2 backend from Maven Central, combined KRaft nodes on OpenJDK 17.

Every client authenticates (SASL/SCRAM-SHA-512 on loopback) and is authorized (StandardAuthorizer, no
ACL: refused): each service has a user that may touch only its own topics and consumer group
(`SERVICE_ACLS`); `admin` (the brokers' own principal, the stack's and the tests' administrator) is the
only super user. The users are created when the storage is formatted; the passwords are generated once into
the state folder (`stack.config.secret_file`, mode 0600) and reach the services as `*_FILE` settings
(`credential_env`); the ACLs are (re)applied when the broker is first seen ready.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from libs.kafka import SASL_MECHANISM, SASL_PROTOCOL, KafkaConfig
from stack.config import StackConfig, login_env, node_address, read_secret
from stack.errors import InstallError
from stack.java import JavaNode
from stack.probes import tcp_open
from stack.progress import Progress

MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
BROKER_ID = 1

ADMIN_USER = "admin"
# The services' topics and groups: their defaults (services/logging/config.py, libs/inference_log.py,
# services/features/config.py StreamConfig).
LOG_TOPIC = "infergrid.inference-log.v1"
LOG_DLQ_TOPIC = "infergrid.inference-log.v1.dlq"
LOG_GROUP = "infergrid-logging"
FEATURES_TOPIC = "infergrid.features.updates"
FEATURES_DLQ_TOPIC = "infergrid.features.updates.dlq"
FEATURES_GROUP = "infergrid-features-ingest"
# Per service user: (resource type, literal name, operations). READ and WRITE imply DESCRIBE; an idempotent
# producer needs no IdempotentWrite on the cluster since Kafka 3.0 (WRITE on a topic is enough, KIP-679).
# CREATE: the logging service creates its two topics at start-up (PipelineConfig.create_topics) and the
# ingester's dead letters auto-create theirs; no one else creates anything.
SERVICE_ACLS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    # The inference log's producer (libs/inference_log.py); the edge produces nothing.
    "gateway": (("topic", LOG_TOPIC, ("WRITE",)),),
    # The inference-log consumer and its dead letters (services/logging/pipeline.py).
    "logging": (
        ("topic", LOG_TOPIC, ("READ", "CREATE")),
        ("group", LOG_GROUP, ("READ",)),
        ("topic", LOG_DLQ_TOPIC, ("WRITE", "CREATE")),
    ),
    # The feature stream ingester (services/features/ingest_stream.py) and its dead letters.
    "features": (
        ("topic", FEATURES_TOPIC, ("READ",)),
        ("group", FEATURES_GROUP, ("READ",)),
        ("topic", FEATURES_DLQ_TOPIC, ("WRITE", "CREATE")),
    ),
}
USERS = (ADMIN_USER, *SERVICE_ACLS)


def password_secret(user: str) -> str:
    """The name of the stack secret holding Kafka user `user`'s password."""
    return f"kafka-{user}"


def credential_env(config: StackConfig, user: str, variable_prefix: str) -> dict[str, str]:
    """A client's Kafka credentials as its `KafkaConfig` variables (the password as `*_FILE`).

    Example: `credential_env(config, "gateway", "INFERGRID_GATEWAY_")`.
    """
    return {
        f"{variable_prefix}KAFKA_SECURITY_PROTOCOL": SASL_PROTOCOL,
        f"{variable_prefix}KAFKA_SASL_MECHANISM": SASL_MECHANISM,
        **login_env(config, "Kafka", user, USERS, f"{variable_prefix}KAFKA_SASL"),
    }


def _quiet() -> logging.Logger:
    """A logger that drops librdkafka's messages (the probes' refused connections while starting)."""
    quiet = logging.getLogger("stack.kafka.probe")
    if not quiet.handlers:  # once: the probe runs every poll
        quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    return quiet


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class Kafka(JavaNode):
    """A broker+controller node; ready when a metadata request to it lists it.

    Alone (the default) it is `kafka`, node id 1, on the stack's address, and every topic has one replica.
    As node `node` of `nodes` it is `kafka-<node>` (node id `node`) on 127.0.0.<node> with the same ports
    as its peers, one of a static quorum of `nodes` voters; internal and new topics get
    min(3, nodes) replicas and min.insync.replicas 2 (1 below three nodes). The nodes of a quorum must
    start together: none is ready before a majority of voters runs. The storage is formatted once (the
    cluster id is kept in the state folder, one for all nodes), so topics and messages survive stop/start.
    """

    kind = "kafka"
    port_names = ("kafka", "kafka_controller")
    # A fresh-clone CI run (the cluster profile's chaos suite at load ~20 on two cores) once restarted a
    # stopped broker that took just over 120 s to register (it was unfenced seconds later): a crash is
    # seen at once anyway (exited during start-up), so the wait for a slow start is generous.
    start_timeout_s = 240.0
    stop_timeout_s = 45.0
    artifact = "kafka_2.13"
    heap = ("256M", "512M")
    _acls_applied = False

    @property
    def node_id(self) -> int:
        """The broker and controller id."""
        return self.node

    @property
    def voters(self) -> str:
        """`controller.quorum.voters`: every node's controller listener."""
        port = self.ports["kafka_controller"]
        return ",".join(f"{n}@{node_address(self.config.host, n)}:{port}" for n in range(1, self.nodes + 1))

    @property
    def cluster_id_file(self) -> Path:
        """Where the cluster id is kept: the node's folder when alone, else one file for every node."""
        if self.nodes == 1:
            return self.data_dir / "cluster-id"
        return self.config.state_dir / "kafka-cluster-id"

    @property
    def bootstrap_servers(self) -> str:
        """For the clients' `bootstrap.servers`."""
        return f"{self.host}:{self.port}"

    def _java(self, *args: str) -> list[str]:
        options = [
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.config.deploy_dir / 'kafka' / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.config.log_dir / self.name}",
        ]
        return self.java(options, *args)

    @property
    def _properties(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def _log_dirs(self) -> Path:
        return self.data_dir / "data"

    def _private(self, path: Path) -> Path:
        """`path` created empty with mode 0600 (what is written into it next stays private)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        return path

    def write_properties(self) -> Path:
        """Renders server.properties into the node's folder, mode 0600 (it holds admin's password)."""
        return self.render(
            self.config.deploy_dir / "kafka" / "server.properties",
            self._private(self._properties),
            {
                "HOST": self.host,
                "BROKER_PORT": self.ports["kafka"],
                "CONTROLLER_PORT": self.ports["kafka_controller"],
                "DATA_DIR": self._log_dirs,
                "NODE_ID": self.node_id,
                "VOTERS": self.voters,
                "REPLICATION": min(3, self.nodes),
                "MIN_ISR": 2 if self.nodes >= 3 else 1,
                "ADMIN_USER": ADMIN_USER,
                "ADMIN_PASSWORD": self.password(ADMIN_USER),
            },
        )

    def prepare(self) -> None:
        """Renders server.properties and formats the storage on first start, with the SCRAM users (the
        cluster id is kept)."""
        super().prepare()
        self.write_properties()
        if (self._log_dirs / "meta.properties").exists():
            if not self._users_marker.exists():
                raise InstallError(
                    f"{self.name}: its storage was formatted without SASL users (before Kafka authenticated "
                    f"its clients); delete it with `python -m stack clean-state {self.kind}`"
                )
            return
        id_file = self.cluster_id_file
        if not id_file.exists():
            # Nodes of one quorum format at the same time: the first id linked into place wins.
            id_file.parent.mkdir(parents=True, exist_ok=True)
            candidate = id_file.with_name(f".{id_file.name}.{self.name}")
            candidate.write_text(new_cluster_id())
            with contextlib.suppress(FileExistsError):
                os.link(candidate, id_file)
            candidate.unlink()
        cluster_id = id_file.read_text().strip()
        Progress(self.name).say(f"formatting storage (cluster id {cluster_id}, users {', '.join(USERS)})")
        # The passwords go in an argument file (0600, deleted after): not on a command line or in a log.
        arguments = self._private(self.data_dir / "format.args")
        scram = [f"SCRAM-SHA-512=[name={user},password={self.password(user)}]" for user in USERS]
        lines = [STORAGE_TOOL_CLASS, "format", "-t", cluster_id, "-c", str(self._properties)]
        arguments.write_text("\n".join([*lines, *(f"--add-scram\n{item}" for item in scram)]) + "\n")
        try:
            Progress(self.name).run(self._java(f"@{arguments}"), log_path=self.log_path)
        finally:
            arguments.unlink(missing_ok=True)
        self._users_marker.write_text(" ".join(USERS) + "\n")

    @property
    def _users_marker(self) -> Path:
        return self.data_dir / "sasl-users"

    def password(self, user: str) -> str:
        """Kafka user `user`'s password (generated on first use). A secret: for clients, never for a log."""
        return read_secret(self.config, password_secret(user))

    def client_conf(self, user: str = ADMIN_USER) -> dict[str, Any]:
        """librdkafka settings to connect as `user` (default: the administrator); they hold its password."""
        return self.kafka_config(user).client_conf()

    def kafka_config(self, user: str = ADMIN_USER) -> KafkaConfig:
        """A `KafkaConfig` connecting as `user` (default: the administrator); it holds the password."""
        return KafkaConfig(
            kafka_bootstrap_servers=self.bootstrap_servers,
            kafka_security_protocol=SASL_PROTOCOL,
            kafka_sasl_mechanism=SASL_MECHANISM,
            kafka_sasl_username=user,
            kafka_sasl_password=self.password(user),
        )

    def apply_acls(self, timeout: float = 30.0) -> None:
        """Creates `SERVICE_ACLS` as the administrator (an existing ACL is left as it is)."""
        from confluent_kafka.admin import (
            AclBinding,
            AclOperation,
            AclPermissionType,
            AdminClient,
            ResourcePatternType,
            ResourceType,
        )

        bindings = [
            AclBinding(
                ResourceType[kind.upper()],
                name,
                ResourcePatternType.LITERAL,
                f"User:{user}",
                "*",
                AclOperation[operation],
                AclPermissionType.ALLOW,
            )
            for user, grants in SERVICE_ACLS.items()
            for kind, name, operations in grants
            for operation in operations
        ]
        settings: dict[str, Any] = {**self.client_conf(), "logger": _quiet()}
        admin = AdminClient(settings)
        for future in admin.create_acls(bindings, request_timeout=timeout).values():
            future.result(timeout=timeout)

    def command(self) -> list[str]:
        """java running kafka.Kafka on the rendered server.properties."""
        return self._java(MAIN_CLASS, str(self._properties))

    def ready(self) -> bool:
        """A metadata request (AdminClient.list_topics) as the administrator lists this broker; the first
        time it does, the ACLs are applied (then it is ready)."""
        if not tcp_open(self.host, self.port):
            return False
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        settings: dict[str, Any] = {**self.client_conf(), "logger": _quiet()}
        admin = AdminClient(settings)
        try:
            metadata = admin.list_topics(timeout=3)
            if self.node_id not in metadata.brokers:
                return False
            if not self._acls_applied:
                self.apply_acls()
                self._acls_applied = True
        except KafkaException:
            return False
        return True

    def endpoints(self) -> dict[str, str]:
        """The bootstrap servers and where the users' passwords are."""
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "passwords": str(self.config.secrets_dir / "kafka-<user>"),
        }
