"""The Component base class: install, start, wait until ready over the real protocol, and stop one server."""

from __future__ import annotations

import abc
import contextlib
import fcntl
import string
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stack.config import StackConfig, node_address
from stack.errors import PortInUseError, StackError, StartupError
from stack.logs import tail_lines
from stack.ports import find_port_holder, is_port_free, port_env_var
from stack.process import ProcessRecord, spawn, terminate, wait_for_exit
from stack.progress import Progress

READY_POLL_S = 0.2


@dataclass(frozen=True)
class ComponentStatus:
    """One row of `stack status`."""

    name: str
    pid: int | None
    ports: Mapping[str, int]
    health: str  # "healthy", "unhealthy" (running, not answering) or "stopped"
    uptime_s: float | None


class Component(abc.ABC):
    """One server of the stack: a process with a command, an environment, ports and a readiness check.

    Subclasses define `install` (idempotent, quick when already done), `prepare` (state folders, rendered
    config files), `command`, `environment` and `ready`. The base class owns the lifecycle: port checks,
    pid files, logs, waiting for readiness, and TERM-then-KILL on stop. It never signals a process it did
    not start: only the pid recorded at start (checked against its start time) is ever stopped.
    """

    #: Registry name and default instance name.
    kind: str = ""
    #: Restarted by the cluster profile's supervisor when it dies: then the record of a dead process is
    #: the supervisor's cue and stays until it restarts it (else a stale record is removed when read).
    supervised: bool = False
    #: Names of the ports (see `stack.ports.DEFAULT_PORTS`); the first is the main one.
    port_names: tuple[str, ...] = ()
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 20.0

    def __init__(
        self, config: StackConfig, *, name: str | None = None, ports: Mapping[str, int] | None = None
    ):
        """Binds the component to a config.

        Args:
            config: The stack configuration (state dir, cache dir, ports).
            name: Instance name (pid file, log file, data folder); defaults to `kind`. Give two instances
                of one kind different names.
            ports: Ports for this instance, overriding the config's for the names given.
        """
        self.config = config
        self.name = name or self.kind
        overrides = dict(ports or {})
        self.ports: dict[str, int] = {p: overrides.get(p, config.port(p)) for p in self.port_names}

    # What a component defines.

    def install(self, progress: Progress) -> None:  # noqa: B027 - optional hook
        """Installs what the component needs (into the cache); must be idempotent and fast when done."""

    def prepare(self) -> None:
        """Creates the data folder and writes rendered config files before each start."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The command line that runs the server in the foreground."""

    def environment(self) -> dict[str, str]:
        """Variables added to the server's environment."""
        return {}

    @abc.abstractmethod
    def ready(self) -> bool:
        """True when the server answers its real protocol; must return within a few seconds."""

    def endpoints(self) -> dict[str, str]:
        """How clients reach the server, for `up` and `status` to print."""
        return {name: f"{self.host}:{port}" for name, port in self.ports.items()}

    # Paths and addresses.

    @property
    def host(self) -> str:
        """The loopback address the server binds."""
        return self.config.host

    @property
    def port(self) -> int:
        """The main port."""
        return self.ports[self.port_names[0]]

    @property
    def data_dir(self) -> Path:
        """The component's folder in the state directory (data, rendered config)."""
        return self.config.state_dir / self.name

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr."""
        return self.config.log_dir / f"{self.name}.log"

    @property
    def install_log_path(self) -> Path:
        """Output of the install commands (apt, Maven, Go)."""
        return self.config.cache_dir / "logs" / f"{self.kind}-install.log"

    @property
    def pid_path(self) -> Path:
        """The pid file of the running server."""
        return self.config.run_dir / f"{self.name}.json"

    def render(self, template: Path, target: Path, variables: Mapping[str, object]) -> Path:
        """Writes `template` with its `${NAME}` placeholders replaced to `target`; returns `target`."""
        try:
            text = string.Template(template.read_text()).substitute({k: str(v) for k, v in variables.items()})
        except (KeyError, ValueError) as exc:
            raise StackError(
                f"{self.name}: cannot render {template}: bad or unknown placeholder {exc}"
            ) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return target

    # Lifecycle.

    def record(self) -> ProcessRecord | None:
        """The live server process started by the stack, or None (a stale pid file is removed, unless the
        supervisor restarts this component: see `supervised`)."""
        record = ProcessRecord.read(self.pid_path)
        if record is None:
            return None
        if not record.is_alive():
            if not self.supervised:
                self.pid_path.unlink(missing_ok=True)
            return None
        return record

    @contextlib.contextmanager
    def _install_lock(self) -> Iterator[None]:
        lock_path = self.config.cache_dir / "locks" / f"{self.kind}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ensure_installed(self, progress: Progress | None = None) -> None:
        """Runs `install` under a lock on the cache, so concurrent sessions do not install twice."""
        with self._install_lock():
            self.install(progress or Progress(self.name))

    def check_ports(self) -> None:
        """Raises PortInUseError naming the port, its variable and its holder when a port is taken."""
        for port_name, port in self.ports.items():
            if is_port_free(self.host, port):
                continue
            holder = find_port_holder(port)
            variable = port_env_var(port_name)
            raise PortInUseError(
                f"{self.name}: port {port} ({port_name}) on {self.host} is already in use by "
                f"{holder.describe()}, which this stack did not start. Stop that process, or choose "
                f"another port with {variable}=<port>."
            )

    def start(self, progress: Progress | None = None) -> ProcessRecord:
        """Installs if needed, starts the server and waits until it is ready; a no-op when running.

        Raises:
            PortInUseError: a port is held by a process the stack did not start.
            StartupError: the server exited, or was not ready within `start_timeout_s` (then it is
                stopped); the message holds the end of its log.
        """
        progress = progress or Progress(self.name)
        running = self.record()
        if running is not None:
            self._wait_ready(running, progress)
            progress.say(f"already running (pid {running.pid})")
            return running
        self.ensure_installed(progress)
        self.check_ports()
        started = time.monotonic()
        self.prepare()
        record = spawn(
            self.name,
            self.command(),
            env=self.environment(),
            cwd=self.data_dir,
            log_path=self.log_path,
            marker=str(self.config.state_dir),
            ports=self.ports,
        )
        record.write(self.pid_path)
        try:
            self._wait_ready(record, progress)
        except BaseException:
            self.stop()
            raise
        progress.say(f"ready in {time.monotonic() - started:.1f} s (pid {record.pid}, log {self.log_path})")
        return record

    def _wait_ready(self, record: ProcessRecord, progress: Progress) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if wait_for_exit(record, 0):
                raise StartupError(
                    f"{self.name} exited during start-up; last lines of {self.log_path}:\n"
                    f"{tail_lines(self.log_path, 40)}"
                )
            if self.ready():
                return
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"{self.name} was not ready after {self.start_timeout_s:.0f} s; last lines of "
                    f"{self.log_path}:\n{tail_lines(self.log_path, 40)}"
                )
            time.sleep(READY_POLL_S)

    def stop(self) -> bool:
        """Stops the server the stack started (TERM, KILL after `stop_timeout_s`); False if none ran."""
        record = self.record()
        if record is None:
            self.pid_path.unlink(missing_ok=True)  # a dead supervised process: it stays down
            return False
        # The record goes first: a supervisor (stack.supervisor) restarts a process that died while its
        # record exists, and this one is meant to die. Should TERM and KILL both fail, `down` still finds
        # the process by its marker.
        self.pid_path.unlink(missing_ok=True)
        terminate(record, self.stop_timeout_s)
        self._wait_ports_released()
        return True

    def _wait_ports_released(self, timeout_s: float = 10.0) -> None:
        """Waits until the stopped process's ports can be bound again, so a restart on the same ports does not
        race sockets the kernel still holds for it (a CI run once saw one seconds after the exit); a port
        still taken after `timeout_s` is left to `check_ports` to report."""
        deadline = time.monotonic() + timeout_s
        for port in self.ports.values():
            while not is_port_free(self.host, port) and time.monotonic() < deadline:
                time.sleep(0.1)

    def status(self) -> ComponentStatus:
        """Pid, ports, health (probed over the real protocol) and uptime."""
        record = self.record()
        if record is None:
            return ComponentStatus(self.name, None, self.ports, "stopped", None)
        health = "healthy" if self.ready() else "unhealthy"
        return ComponentStatus(self.name, record.pid, record.ports, health, time.time() - record.started_at)


class NodeComponent(Component):
    """A server that may run as node `node` (1-based) of `nodes` (a Cassandra ring, a Kafka quorum): alone
    it is named after its kind and binds the stack's address, in a cluster `<kind>-<node>` on 127.0.0.<node>."""

    def __init__(
        self,
        config: StackConfig,
        *,
        name: str | None = None,
        ports: Mapping[str, int] | None = None,
        node: int = 1,
        nodes: int = 1,
    ) -> None:
        """See `Component.__init__`; `node` of `nodes` places it in a multi-node cluster."""
        if not 1 <= node <= nodes:
            raise ValueError(f"node {node} is not in 1..{nodes}")
        self.node = node
        self.nodes = nodes
        super().__init__(
            config, name=name or (self.kind if nodes == 1 else f"{self.kind}-{node}"), ports=ports
        )

    @property
    def host(self) -> str:
        """The stack's address when alone, else 127.0.0.<node>."""
        return node_address(self.config.host, self.node)


class CommandComponent(Component):
    """A component described by data rather than a subclass, e.g. an InferGrid service.

    Example:
        CommandComponent(
            config, name="features", port_names=("features",),
            command=[sys.executable, "-m", "services.features"],
            env={"FEATURES_PORT": str(config.port("features"))},
            probe=lambda c: grpc_health_serving(c.host, c.port),
        )
    """

    def __init__(
        self,
        config: StackConfig,
        *,
        name: str,
        port_names: Sequence[str],
        command: Sequence[str],
        probe: Callable[[Component], bool],
        env: Mapping[str, str] | None = None,
        ports: Mapping[str, int] | None = None,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 20.0,
    ) -> None:
        """Describes the process; see `Component.__init__` for `config`, `name` and `ports`."""
        self.kind = name
        self.port_names = tuple(port_names)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._command = list(command)
        self._env = dict(env or {})
        self._probe = probe
        super().__init__(config, name=name, ports=ports)

    def command(self) -> list[str]:
        """The command given at construction."""
        return list(self._command)

    def environment(self) -> dict[str, str]:
        """The variables given at construction."""
        return dict(self._env)

    def ready(self) -> bool:
        """The probe given at construction."""
        return self._probe(self)

    def set_probe(self, probe: Callable[[Component], bool]) -> None:
        """Replaces the readiness probe (e.g. a health port of its own)."""
        self._probe = probe
