"""Cassandra 5.0: cassandra-all and its runtime jars from Maven Central, one node on OpenJDK 17."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from stack.component import Component
from stack.errors import InstallError
from stack.java import ensure_java_home, find_java_home
from stack.maven import copy_dependencies, pom_property
from stack.probes import tcp_open
from stack.progress import Progress

MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"


class Cassandra(Component):
    """A single Cassandra node; ready when `SELECT release_version FROM system.local` answers over CQL.

    Data (keyspaces, tables, rows) lives in the state folder and survives stop/start.
    """

    kind = "cassandra"
    port_names = ("cassandra", "cassandra_storage")
    start_timeout_s = 180.0
    stop_timeout_s = 45.0
    heap = ("512M", "1G")

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
        """`SELECT release_version FROM system.local` answers over CQL."""
        if not tcp_open(self.host, self.port):
            return False
        from cassandra.cluster import Cluster

        # The driver logs each failed attempt as a warning; while starting, failing probes are expected.
        driver_logger = logging.getLogger("cassandra")
        level = driver_logger.level
        driver_logger.setLevel(logging.CRITICAL)
        cluster = Cluster([self.host], port=self.port, connect_timeout=3, control_connection_timeout=3)
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local", timeout=3).one()
            return row is not None
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
