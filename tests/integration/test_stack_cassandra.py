"""The stack's Cassandra: a real cassandra-driver client round-trips as the administrator, and the roles hold.

Anonymous clients, wrong passwords and the default `cassandra/cassandra` superuser are refused; the
features and logging roles create and use their own tables in the services' keyspace and get Unauthorized
on each other's tables, on keyspaces and on `system_auth`; no password is in Cassandra's logs.
"""

import stat
import uuid
from collections.abc import Iterator

import pytest
from cassandra import Unauthorized
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable, Session

from libs.cassandra import AsyncCassandra, CassandraConfig, connect
from services.features.store import SCHEMA as FEATURES_SCHEMA
from services.logging.store import create_schema as create_logging_schema
from stack.cassandra import (
    ADMIN_ROLE,
    KEYSPACE,
    SERVICE_ROLES,
    SINGLE_REPLICATION,
    Cassandra,
    credential_env,
    password_file,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def session(cassandra_server: Cassandra) -> Iterator[Session]:
    cluster = Cluster(
        cassandra_server.contact_points,
        port=cassandra_server.port,
        auth_provider=cassandra_server.auth_provider,
        connect_timeout=10,
    )
    try:
        yield cluster.connect()
    finally:
        cluster.shutdown()


def _role_session(server: Cassandra, role: str) -> Session:
    """A session of the service's role, opened the way the service opens it (libs.cassandra.connect)."""
    config = CassandraConfig(
        cassandra_contact_points=tuple(server.contact_points),
        cassandra_port=server.port,
        cassandra_username=role,
        cassandra_password=password_file(server.config, role).read_text().strip(),
        cassandra_request_timeout_s=30.0,
    )
    session = connect(config)
    if role == "features":
        for cql in FEATURES_SCHEMA:
            session.execute(cql, timeout=60)
    else:
        create_logging_schema(AsyncCassandra(session, config))
    return session


def test_create_keyspace_and_table_write_and_read_back(session: Session) -> None:
    keyspace = f"stack_test_{uuid.uuid4().hex[:8]}"
    session.execute(
        f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
    )
    try:
        session.execute(f"CREATE TABLE {keyspace}.features (entity text PRIMARY KEY, score double)")
        insert = session.prepare(f"INSERT INTO {keyspace}.features (entity, score) VALUES (?, ?)")
        session.execute(insert, ("user-1", 0.25))

        row = session.execute(f"SELECT score FROM {keyspace}.features WHERE entity = %s", ("user-1",)).one()

        assert row is not None
        assert row.score == 0.25
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


def test_release_version_is_five(session: Session) -> None:
    row = session.execute("SELECT release_version FROM system.local").one()
    assert row.release_version.startswith("5.0")


def test_anonymous_wrong_passwords_and_the_default_superuser_are_refused(cassandra_server: Cassandra) -> None:
    logins = [
        None,
        PlainTextAuthProvider("cassandra", "cassandra"),
        *(PlainTextAuthProvider(role, "not-it") for role in (ADMIN_ROLE, *SERVICE_ROLES)),
    ]
    admitted = []
    for auth in logins:
        cluster = Cluster(cassandra_server.contact_points, port=cassandra_server.port, auth_provider=auth)
        try:
            cluster.connect()
            admitted.append(auth.username if auth else "anonymous")
        except NoHostAvailable as exc:
            assert "authenticat" in str(exc).lower() or "credentials" in str(exc).lower(), exc
        finally:
            cluster.shutdown()
    assert admitted == []


def test_the_roles_use_their_own_tables_only(cassandra_server: Cassandra) -> None:
    features, logging = (
        _role_session(cassandra_server, "features"),
        _role_session(cassandra_server, "logging"),
    )
    try:
        key = uuid.uuid4().bytes
        features.execute(
            "INSERT INTO feature_values (view_name, entity_key, cells) VALUES (%s, %s, %s)",
            ("roles-test", key, {"f": b"1"}),
        )
        assert features.execute(
            "SELECT cells FROM feature_values WHERE view_name = %s AND entity_key = %s", ("roles-test", key)
        ).one().cells == {"f": b"1"}
        assert logging.execute("SELECT * FROM inference_log_by_tenant_request LIMIT 1") is not None

        others = {
            "features": (features, SERVICE_ROLES["logging"]),
            "logging": (logging, SERVICE_ROLES["features"]),
        }
        for role, (own, tables) in others.items():
            for table in tables:
                for cql in (f"SELECT * FROM {KEYSPACE}.{table} LIMIT 1", f"TRUNCATE {KEYSPACE}.{table}",
                            f"DROP TABLE {KEYSPACE}.{table}"):  # fmt: skip
                    with pytest.raises(Unauthorized):
                        own.execute(cql)
                        pytest.fail(f"{role} ran {cql}")
            with pytest.raises(Unauthorized):
                own.execute("SELECT salted_hash FROM system_auth.roles")
            with pytest.raises(Unauthorized):
                own.execute(f"CREATE KEYSPACE {role}_own WITH replication = {SINGLE_REPLICATION}")
            with pytest.raises(Unauthorized):
                own.execute(f"CREATE ROLE {role}_friend WITH PASSWORD = 'x' AND LOGIN = true")
        with pytest.raises(Unauthorized):
            logging.execute(
                "INSERT INTO infergrid.feature_values (view_name, entity_key, cells) VALUES (%s, %s, %s)",
                ("roles-test", key, {"f": b"2"}),
            )
    finally:
        features.cluster.shutdown()
        logging.cluster.shutdown()


def test_setup_is_idempotent_and_no_password_reaches_the_logs(cassandra_server: Cassandra) -> None:
    # What a second `up` on the same data runs: the roles exist, nothing fails, the passwords still work.
    cassandra_server.setup_roles(SINGLE_REPLICATION)
    _role_session(cassandra_server, "features").cluster.shutdown()

    config = cassandra_server.config
    assert stat.S_IMODE(config.secrets_dir.stat().st_mode) == 0o700
    passwords = {}
    for role in (ADMIN_ROLE, *SERVICE_ROLES):
        path = password_file(config, role)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        passwords[role] = path.read_text().strip()
    assert credential_env(config, "logging", "P") == {"P_USERNAME": "logging", "P_PASSWORD_FILE": str(path)}
    logs = [p for p in config.log_dir.rglob("*") if p.is_file() and p.name.startswith("cassandra")]
    logs += [p for p in (config.log_dir / cassandra_server.name).rglob("*") if p.is_file()]
    assert logs, f"no Cassandra log under {config.log_dir}"
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert [role for role, password in passwords.items() if password in text] == []
