"""Kafka 4.x: kafka_2.13 and a log4j2 backend from Maven Central, combined KRaft nodes on OpenJDK 17."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from stack.component import NodeComponent
from stack.config import node_address
from stack.errors import InstallError
from stack.java import ensure_java_home, find_java_home
from stack.maven import copy_dependencies, pom_property
from stack.probes import tcp_open
from stack.progress import Progress

MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
BROKER_ID = 1


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class Kafka(NodeComponent):
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
    start_timeout_s = 120.0
    stop_timeout_s = 45.0
    heap = ("256M", "512M")

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
    def _pom(self) -> Path:
        return self.config.deploy_dir / "kafka" / "pom.xml"

    @property
    def version(self) -> str:
        """The Kafka version, from deploy/local/kafka/pom.xml."""
        return pom_property(self._pom, "kafka.version")

    @property
    def lib_dir(self) -> Path:
        """The flattened broker classpath in the cache."""
        return self.config.cache_dir / f"kafka-{self.version}" / "lib"

    @property
    def bootstrap_servers(self) -> str:
        """For the clients' `bootstrap.servers`."""
        return f"{self.host}:{self.port}"

    def install(self, progress: Progress) -> None:
        """Finds (or installs) OpenJDK 17, then copies Kafka's jars from Maven Central into the cache."""
        if self.lib_dir.is_dir() and find_java_home(self.config.java_home) is not None:
            return
        progress.step(1, 2, "finding OpenJDK 17")
        java_home = ensure_java_home(self.config.java_home, progress, self.install_log_path)
        if not self.lib_dir.is_dir():
            progress.step(2, 2, f"fetching kafka_2.13 {self.version} and its jars from Maven Central")
            copy_dependencies(self._pom, self.lib_dir, java_home, progress, self.install_log_path)

    def _java(self, *args: str) -> list[str]:
        java_home = find_java_home(self.config.java_home)
        if java_home is None:
            raise InstallError("no Java 17 found; run `python -m stack up kafka` to install it")
        return [
            str(java_home / "bin" / "java"),
            f"-Xms{self.heap[0]}",
            f"-Xmx{self.heap[1]}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.config.deploy_dir / 'kafka' / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.config.log_dir / self.name}",
            "-cp",
            f"{self.lib_dir}/*",
            *args,
        ]

    @property
    def _properties(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def _log_dirs(self) -> Path:
        return self.data_dir / "data"

    def prepare(self) -> None:
        """Renders server.properties and formats the storage on first start (the cluster id is kept)."""
        super().prepare()
        self.render(
            self.config.deploy_dir / "kafka" / "server.properties",
            self._properties,
            {
                "HOST": self.host,
                "BROKER_PORT": self.ports["kafka"],
                "CONTROLLER_PORT": self.ports["kafka_controller"],
                "DATA_DIR": self._log_dirs,
                "NODE_ID": self.node_id,
                "VOTERS": self.voters,
                "REPLICATION": min(3, self.nodes),
                "MIN_ISR": 2 if self.nodes >= 3 else 1,
            },
        )
        if (self._log_dirs / "meta.properties").exists():
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
        Progress(self.name).say(f"formatting storage (cluster id {cluster_id})")
        Progress(self.name).run(
            self._java(STORAGE_TOOL_CLASS, "format", "-t", cluster_id, "-c", str(self._properties)),
            log_path=self.log_path,
        )

    def command(self) -> list[str]:
        """java running kafka.Kafka on the rendered server.properties."""
        return self._java(MAIN_CLASS, str(self._properties))

    def ready(self) -> bool:
        """A metadata request (AdminClient.list_topics) lists this broker."""
        if not tcp_open(self.host, self.port):
            return False
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        quiet = logging.getLogger("stack.kafka.probe")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        settings: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers, "logger": quiet}
        admin = AdminClient(settings)
        try:
            metadata = admin.list_topics(timeout=3)
        except KafkaException:
            return False
        return self.node_id in metadata.brokers

    def endpoints(self) -> dict[str, str]:
        """The bootstrap servers."""
        return {"bootstrap.servers": self.bootstrap_servers}
