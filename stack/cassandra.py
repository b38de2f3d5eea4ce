"""Cassandra 5.0: cassandra-all and its runtime jars from Maven Central, one node (or one of N) on OpenJDK 17.

Every client logs in (PasswordAuthenticator) and may do only what it was granted (CassandraAuthorizer).
On first start `Cassandra.setup_roles` replaces the default `cassandra/cassandra` superuser with `admin`
(the stack's probes, the tests) and creates one role per service (`SERVICE_ROLES`) that may create tables
in the services' keyspace and use only its own tables, as deploy/README.md has the operator do; the
feature stream ingester logs in as `features`. The passwords are generated once into the state folder
(`stack.config.secret_file`, mode 0600) and reach the services as `*_PASSWORD_FILE` (`credential_env`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stack.config import StackConfig, login_env, node_address, read_secret, secret_file
from stack.errors import InstallError, StartupError
from stack.java import JavaNode, find_java_home
from stack.probes import tcp_open
from stack.process import ProcessRecord
from stack.progress import Progress

if TYPE_CHECKING:
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import Session

    from libs.cassandra import CassandraConfig

MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"
SINGLE_CLUSTER_NAME = "InferGrid Local"
MULTI_CLUSTER_NAME = "InferGrid Local Cluster"
_TOKEN_MIN = -(2**63)
ADMIN_ROLE = "admin"
_DEFAULT_SUPERUSER = ("cassandra", "cassandra")
# The services' keyspace (libs/cassandra.py's default `cassandra_keyspace`), created by the administrator.
KEYSPACE = "infergrid"
SINGLE_REPLICATION = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
# Each service's role and the tables it owns in KEYSPACE (services/features/store.py,
# services/logging/store.py). A role creates its tables (and then holds every permission on them); tables
# created before the roles existed are granted SELECT and MODIFY.
SERVICE_ROLES: dict[str, tuple[str, ...]] = {
    "features": ("feature_values", "feature_views"),
    "logging": ("inference_log_by_tenant_request", "inference_log_by_tenant_model"),
}
# Role statements take no bind markers: a password is spliced in as a literal, so it must be one of ours
# (`secrets.token_urlsafe`), never a quote.
_PASSWORD = re.compile(r"^[A-Za-z0-9_-]{16,}$")


def password_file(config: StackConfig, role: str) -> Path:
    """The file holding Cassandra role `role`'s password (generated on first use)."""
    return secret_file(config, f"cassandra-{role}")


def credential_env(config: StackConfig, role: str, variable_prefix: str) -> dict[str, str]:
    """A service's Cassandra credentials as its variables: `<prefix>_USERNAME` and `<prefix>_PASSWORD_FILE`.

    Example: `credential_env(config, "features", "INFERGRID_FEATURES_CASSANDRA")`.
    """
    return login_env(config, "Cassandra", role, SERVICE_ROLES, variable_prefix)


def admin_env(config: StackConfig, variable_prefix: str) -> dict[str, str]:
    """The administrator's login as a process's variables (tests whose services use keyspaces of their own)."""
    return login_env(config, "Cassandra", ADMIN_ROLE, (ADMIN_ROLE,), variable_prefix)


def admin_auth(config: StackConfig) -> PlainTextAuthProvider:
    """The administrator's login, for `cassandra.cluster.Cluster(..., auth_provider=...)` (tests, tools)."""
    from cassandra.auth import PlainTextAuthProvider

    return PlainTextAuthProvider(ADMIN_ROLE, read_secret(config, f"cassandra-{ADMIN_ROLE}"))


def _password(config: StackConfig, role: str) -> str:
    password = read_secret(config, f"cassandra-{role}")
    if not _PASSWORD.match(password):
        raise StartupError(f"{password_file(config, role)} does not hold a generated password; delete it")
    return password


def initial_token(node: int, nodes: int) -> int:
    """Node `node` (1-based) of `nodes`: evenly spaced Murmur3 tokens; a lone node keeps token 0."""
    if nodes == 1:
        return 0
    return _TOKEN_MIN + (node - 1) * (2**64 // nodes)


class Cassandra(JavaNode):
    """A Cassandra node; ready when `SELECT release_version FROM system.local` answers over CQL.

    Clients log in: `admin_auth(config)` (the administrator) or a service's role (`credential_env`).
    Alone (the default) it is `cassandra` on the stack's address. As node `node` of `nodes` it is
    `cassandra-<node>` on the loopback address 127.0.0.<node> (same ports on every node; Linux routes all
    of 127/8 to lo), with one token of its own and node 1 as the seed. Data (keyspaces, tables, rows)
    lives in the state folder and survives stop/start.
    """

    kind = "cassandra"
    port_names = ("cassandra", "cassandra_storage")
    start_timeout_s = 180.0
    stop_timeout_s = 45.0
    artifact = "cassandra-all"
    heap = ("512M", "1G")
    cluster_heap = ("384M", "512M")

    @property
    def seeds(self) -> str:
        """The seed list: node 1's storage address."""
        return f"{node_address(self.config.host, 1)}:{self.ports['cassandra_storage']}"

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
        jamm = sorted(self.lib_dir.glob("jamm-*.jar"))
        if not jamm:
            raise InstallError(f"no jamm jar in {self.lib_dir}; remove that folder to reinstall")
        log_dir = self.config.log_dir / self.name
        log_dir.mkdir(parents=True, exist_ok=True)
        options = [
            *self._jvm_options(),
            f"-javaagent:{jamm[-1]}",
            f"-Dcassandra.config=file://{self.data_dir / 'conf' / 'cassandra.yaml'}",
            f"-Dcassandra.storagedir={self.data_dir}",
            f"-Dcassandra.logdir={log_dir}",
            f"-Dlogback.configurationFile={self.config.deploy_dir / 'cassandra' / 'logback.xml'}",
            f"-Dcassandra.available_processors={min(os.cpu_count() or 2, 4)}",
            # The default superuser (replaced by `setup_roles`) is created this long after start, not 10 s;
            # a node of several retries until its peers answer, hence not 0 there.
            f"-Dcassandra.superuser_setup_delay_ms={0 if self.nodes == 1 else 500}",
            # The logins and grants on every node of a cluster.
            f"-Dcassandra.system_auth.default_rf={self.nodes}",
        ]
        return self.java(options, MAIN_CLASS)

    def environment(self) -> dict[str, str]:
        """JAVA_HOME of the JDK 17 in use."""
        java_home = find_java_home(self.config.java_home)
        return {"JAVA_HOME": str(java_home)} if java_home else {}

    def start(self, progress: Progress | None = None) -> ProcessRecord:
        """Starts (or finds) the node; alone, it then sets up the roles (a cluster's, once all are up)."""
        record = super().start(progress)
        if self.nodes == 1:
            self.setup_roles(SINGLE_REPLICATION)
        return record

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
        from cassandra.query import SimpleStatement

        try:
            with self._session() as session:
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

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """A session with this node only, as the administrator or else (before `setup_roles`) as the
        default superuser; the driver's warnings about failed attempts are muted (expected while starting).

        Raises:
            NoHostAvailable: neither login worked, or the node does not answer.
        """
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
        from cassandra.policies import WhiteListRoundRobinPolicy

        driver_logger = logging.getLogger("cassandra")
        level = driver_logger.level
        driver_logger.setLevel(logging.CRITICAL)
        try:
            logins = (admin_auth(self.config), PlainTextAuthProvider(*_DEFAULT_SUPERUSER))
            for attempt, auth in enumerate(logins):
                # This node only: the probe must not pass because a peer answered.
                cluster = Cluster(
                    [self.host],
                    port=self.port,
                    auth_provider=auth,
                    connect_timeout=3,
                    control_connection_timeout=3,
                    execution_profiles={
                        EXEC_PROFILE_DEFAULT: ExecutionProfile(
                            load_balancing_policy=WhiteListRoundRobinPolicy([self.host]),
                            request_timeout=30,  # schema and role changes on a busy machine
                        )
                    },
                )
                try:
                    session = cluster.connect()
                except NoHostAvailable:
                    cluster.shutdown()
                    if attempt == len(logins) - 1:
                        raise
                    continue
                try:
                    yield session
                finally:
                    cluster.shutdown()
                return
        finally:
            driver_logger.setLevel(level)

    def setup_roles(self, replication: str) -> None:
        """Makes the node's cluster authenticate as the stack expects; idempotent (each `up` runs it).

        On first start: `admin` (a superuser with the generated password) replaces `cassandra/cassandra`.
        Then the services' keyspace (with `replication`) and each service's role: CREATE on the keyspace,
        SELECT and MODIFY on its tables that exist already; a cluster's `system_auth` on every node.

        Raises:
            StartupError: neither the administrator nor the default superuser may log in (the password
                file no longer matches the data).
        """
        try:
            with self._session() as session:
                if self.nodes > 1:
                    auth = session.cluster.metadata.keyspaces["system_auth"].replication_strategy
                    if getattr(auth, "replication_factor", None) != self.nodes:
                        session.execute(
                            "ALTER KEYSPACE system_auth WITH replication = "
                            f"{{'class': 'SimpleStrategy', 'replication_factor': {self.nodes}}}"
                        )
                if session.cluster.auth_provider.username == ADMIN_ROLE:
                    self._grant(session, replication)
                    return
                session.execute(
                    f"CREATE ROLE IF NOT EXISTS {ADMIN_ROLE} WITH PASSWORD = "
                    f"'{_password(self.config, ADMIN_ROLE)}' AND SUPERUSER = true AND LOGIN = true",
                )
            with self._session() as session:
                session.execute(f"DROP ROLE IF EXISTS {_DEFAULT_SUPERUSER[0]}")
                self._grant(session, replication)
        except StartupError:
            raise
        except Exception as exc:
            raise StartupError(
                f"{self.name}: cannot set up its roles: {exc!s:.500}; if {password_file(self.config, ADMIN_ROLE)} "
                f"was replaced after the first start, `python -m stack clean-state {self.kind}` starts afresh"
            ) from None

    def _grant(self, session: Session, replication: str) -> None:
        """As the administrator: the services' keyspace and roles (see `setup_roles`)."""
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = {replication}", timeout=30
        )
        tables = session.cluster.metadata.keyspaces[KEYSPACE].tables
        for role, owned in SERVICE_ROLES.items():
            password = _password(self.config, role)
            session.execute(f"CREATE ROLE IF NOT EXISTS {role} WITH PASSWORD = '{password}' AND LOGIN = true")
            session.execute(f"GRANT CREATE ON KEYSPACE {KEYSPACE} TO {role}")
            for table in (t for t in owned if t in tables):
                session.execute(f"GRANT SELECT ON {KEYSPACE}.{table} TO {role}")
                session.execute(f"GRANT MODIFY ON {KEYSPACE}.{table} TO {role}")

    @property
    def admin_password(self) -> str:
        """The password of `admin`, the administrator (the stack's probes, the tests); never log it."""
        return read_secret(self.config, f"cassandra-{ADMIN_ROLE}")

    @property
    def auth_provider(self) -> PlainTextAuthProvider:
        """The administrator's login: `Cluster(contact_points, port=port, auth_provider=auth_provider)`."""
        return admin_auth(self.config)

    @property
    def contact_points(self) -> list[str]:
        """For `cassandra.cluster.Cluster(contact_points, port=...)`."""
        return [self.host]

    def admin_config(self, keyspace: str, **settings: Any) -> CassandraConfig:
        """The administrator's `libs.cassandra.CassandraConfig` for `keyspace` (tests whose stores use
        keyspaces of their own), `settings` its other fields. It holds the password: never log it."""
        from libs.cassandra import CassandraConfig

        return CassandraConfig(
            cassandra_contact_points=tuple(self.contact_points),
            cassandra_port=self.port,
            cassandra_username=ADMIN_ROLE,
            cassandra_password=self.admin_password,
            cassandra_keyspace=keyspace,
            **settings,
        )

    def endpoints(self) -> dict[str, str]:
        """The CQL address and where the roles' passwords are."""
        return {
            "cql": f"{self.host}:{self.port}",
            "passwords": str(self.config.secrets_dir / "cassandra-<role>"),
        }
