"""Cassandra 5.0: cassandra-all and its runtime jars from Maven Central, one node (or one of N) on OpenJDK 17."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from stack.component import NodeComponent
from stack.config import StackConfig, node_address
from stack.errors import InstallError
from stack.java import ensure_java_home, find_java_home
from stack.maven import copy_dependencies, pom_property
from stack.probes import tcp_open
from stack.progress import Progress

MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"
SINGLE_CLUSTER_NAME = "InferGrid Local"
MULTI_CLUSTER_NAME = "InferGrid Local Cluster"
_TOKEN_MIN = -(2**63)


def initial_token(node: int, nodes: int) -> int:
    """Node `node` (1-based) of `nodes`: evenly spaced Murmur3 tokens; a lone node keeps token 0."""
    if nodes == 1:
        return 0
    return _TOKEN_MIN + (node - 1) * (2**64 // nodes)


class Cassandra(NodeComponent):
    """A Cassandra node; ready when `SELECT release_version FROM system.local` answers over CQL.

    Alone (the default) it is `cassandra` on the stack's address. As node `node` of `nodes` it is
    `cassandra-<node>` on the loopback address 127.0.0.<node> (same ports on every node; Linux routes all
    of 127/8 to lo), with one token of its own and node 1 as the seed. Data (keyspaces, tables, rows)
    lives in the state folder and survives stop/start.
    """

    kind = "cassandra"
    port_names = ("cassandra", "cassandra_storage")
    start_timeout_s = 180.0
    stop_timeout_s = 45.0
    heap = ("512M", "1G")
    cluster_heap = ("384M", "512M")

    def __init__(
        self,
        config: StackConfig,
        *,
        name: str | None = None,
        ports: Mapping[str, int] | None = None,
        node: int = 1,
        nodes: int = 1,
    ) -> None:
        """See `NodeComponent.__init__`; a node of a cluster gets the smaller heap."""
        super().__init__(config, name=name, ports=ports, node=node, nodes=nodes)
        if self.nodes > 1:
            self.heap = self.cluster_heap

    @property
    def seeds(self) -> str:
        """The seed list: node 1's storage address."""
        return f"{node_address(self.config.host, 1)}:{self.ports['cassandra_storage']}"

    @property
    def _pom(self) -> Path:
        return self.config.deploy_dir / "cassandra" / "pom.xml"

    @property
    def version(self) -> str:
        """The Cassandra version, from deploy/local/cassandra/pom.xml."""
        return pom_property(self._pom, "cassandra.version")

    @property
    def lib_dir(self) -> Path:
        """The flattened runtime classpath in the cache."""
        return self.config.cache_dir / f"cassandra-{self.version}" / "lib"

    def install(self, progress: Progress) -> None:
        """Finds (or installs) OpenJDK 17, then copies Cassandra's jars from Maven Central into the cache."""
        if self.lib_dir.is_dir() and find_java_home(self.config.java_home) is not None:
            return
        progress.step(1, 2, "finding OpenJDK 17")
        java_home = ensure_java_home(self.config.java_home, progress, self.install_log_path)
        if not self.lib_dir.is_dir():
            progress.step(2, 2, f"fetching cassandra-all {self.version} and its jars from Maven Central")
            copy_dependencies(self._pom, self.lib_dir, java_home, progress, self.install_log_path)

    def prepare(self) -> None:
        """Renders cassandra.yaml into the state folder."""
        super().prepare()
        self.render(
            self.config.deploy_dir / "cassandra" / "cassandra.yaml",
            self.data_dir / "conf" / "cassandra.yaml",
            {
                "HOST": self.host,
                "CQL_PORT": self.ports["cassandra"],
                "STORAGE_PORT": self.ports["cassandra_storage"],
                "DATA_DIR": self.data_dir,
                "SEEDS": self.seeds,
                "INITIAL_TOKEN": initial_token(self.node, self.nodes),
                "CLUSTER_NAME": SINGLE_CLUSTER_NAME if self.nodes == 1 else MULTI_CLUSTER_NAME,
            },
        )

    def _jvm_options(self) -> list[str]:
        lines = (self.config.deploy_dir / "cassandra" / "jvm.options").read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]

    def command(self) -> list[str]:
        """java with Cassandra's JDK 17 options, the jamm agent and our config, running CassandraDaemon."""
        java_home = find_java_home(self.config.java_home)
        if java_home is None:
            raise InstallError("no Java 17 found; run `python -m stack up cassandra` to install it")
        jamm = sorted(self.lib_dir.glob("jamm-*.jar"))
        if not jamm:
            raise InstallError(f"no jamm jar in {self.lib_dir}; remove that folder to reinstall")
        log_dir = self.config.log_dir / self.name
        log_dir.mkdir(parents=True, exist_ok=True)
        return [
            str(java_home / "bin" / "java"),
            f"-Xms{self.heap[0]}",
            f"-Xmx{self.heap[1]}",
            *self._jvm_options(),
            f"-javaagent:{jamm[-1]}",
            f"-Dcassandra.config=file://{self.data_dir / 'conf' / 'cassandra.yaml'}",
            f"-Dcassandra.storagedir={self.data_dir}",
            f"-Dcassandra.logdir={log_dir}",
            f"-Dlogback.configurationFile={self.config.deploy_dir / 'cassandra' / 'logback.xml'}",
            f"-Dcassandra.available_processors={min(os.cpu_count() or 2, 4)}",
            "-cp",
            f"{self.lib_dir}/*",
            MAIN_CLASS,
        ]

    def environment(self) -> dict[str, str]:
        """JAVA_HOME of the JDK 17 in use."""
        java_home = find_java_home(self.config.java_home)
        return {"JAVA_HOME": str(java_home)} if java_home else {}

    def ready(self) -> bool:
        """`SELECT release_version FROM system.local` answers over CQL.

        A node of several must also see a quorum of the ring up: a read of `system_distributed` (three
        replicas by default) at QUORUM, coordinated by this node, succeeds.
        """
        return self.sees_peers("QUORUM" if self.nodes > 1 else None)

    def sees_peers(self, consistency: str | None) -> bool:
        """This node answers CQL and, given a consistency level (QUORUM, ALL), coordinates a read of
        `system_distributed` at that level: its failure detector holds that many replicas up."""
        if not tcp_open(self.host, self.port):
            return False
        from cassandra import ConsistencyLevel
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import WhiteListRoundRobinPolicy
        from cassandra.query import SimpleStatement

        # The driver logs each failed attempt as a warning; while starting, failing probes are expected.
        driver_logger = logging.getLogger("cassandra")
        level = driver_logger.level
        driver_logger.setLevel(logging.CRITICAL)
        # This node only: the probe must not pass because a peer answered.
        cluster = Cluster(
            [self.host],
            port=self.port,
            connect_timeout=3,
            control_connection_timeout=3,
            execution_profiles={
                EXEC_PROFILE_DEFAULT: ExecutionProfile(
                    load_balancing_policy=WhiteListRoundRobinPolicy([self.host])
                )
            },
        )
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local", timeout=3).one()
            if row is None:
                return False
            if consistency is not None:
                probe = SimpleStatement(
                    "SELECT * FROM system_distributed.view_build_status LIMIT 1",
                    consistency_level=ConsistencyLevel.name_to_value[consistency],
                )
                session.execute(probe, timeout=3)
            return True
        except Exception:  # any driver error means "not ready yet"
            return False
        finally:
            cluster.shutdown()
            driver_logger.setLevel(level)

    @property
    def contact_points(self) -> list[str]:
        """For `cassandra.cluster.Cluster(contact_points, port=...)`."""
        return [self.host]

    def endpoints(self) -> dict[str, str]:
        """The CQL address."""
        return {"cql": f"{self.host}:{self.port}"}
