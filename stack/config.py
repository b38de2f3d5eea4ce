"""The stack's configuration: one frozen dataclass read once from the environment."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stack.errors import ConfigError
from stack.ports import DEFAULT_PORTS, port_env_var

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every server the stack starts listens on loopback only.
LOOPBACK = "127.0.0.1"

# What `make up` runs: "single" (one of everything, state in .state/) or "cluster" (three Cassandra nodes,
# three Kafka brokers, a Redis replica, two replicas of each service and a supervisor; state in
# .state/cluster/). Chosen with `python -m stack --profile NAME` or INFERGRID_STACK_PROFILE.
PROFILE_VARIABLE = "INFERGRID_STACK_PROFILE"
PROFILES = ("single", "cluster")


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and caches, and which ports its servers use.

    Attributes:
        state_dir: Data directories, logs and pid files (INFERGRID_STATE_DIR, default `<repo>/.state`).
        cache_dir: Installed jars and binaries, shared by every clone
            (INFERGRID_CACHE_DIR, default `~/.cache/infergrid`).
        ports: Port per name; defaults in `stack.ports.DEFAULT_PORTS`, each overridden by
            INFERGRID_<NAME>_PORT (e.g. INFERGRID_REDIS_PORT, INFERGRID_ENVOY_ADMIN_PORT).
        java_home: The OpenJDK 17 to run Cassandra and Kafka on (INFERGRID_JAVA_HOME); found under
            /usr/lib/jvm (and installed with apt when missing) when unset.
        repo_root: The checkout whose `deploy/local` holds the servers' configuration files.
        host: The address every server binds; loopback only.
        platform_file: The live platform config the control plane, edge and gateway watch
            (INFERGRID_PLATFORM_FILE, default `<repo>/deploy/local/platform.yaml`; in the cluster profile
            `<state>/platform.yaml`, rendered from `deploy/local/platform-cluster.yaml`).
        profile: "single" or "cluster" (INFERGRID_STACK_PROFILE); see `stack.cluster`.
    """

    state_dir: Path
    cache_dir: Path
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    java_home: Path | None = None
    repo_root: Path = REPO_ROOT
    host: str = LOOPBACK
    platform_file: Path = REPO_ROOT / "deploy" / "local" / "platform.yaml"
    profile: str = "single"

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, profile: str | None = None) -> StackConfig:
        """Builds the config from environment variables (pass `os.environ`).

        Args:
            env: The environment.
            profile: Overrides INFERGRID_STACK_PROFILE (the CLI's `--profile`).

        Raises:
            ConfigError: a variable holds a malformed value; the message names it.
        """
        profile = profile or env.get(PROFILE_VARIABLE) or "single"
        if profile not in PROFILES:
            raise ConfigError(f"{PROFILE_VARIABLE}={profile!r}: the profiles are {', '.join(PROFILES)}")
        default_state = REPO_ROOT / ".state" if profile == "single" else REPO_ROOT / ".state" / profile
        state_dir = Path(env.get("INFERGRID_STATE_DIR") or default_state)
        cache_dir = Path(env.get("INFERGRID_CACHE_DIR") or Path.home() / ".cache" / "infergrid")
        ports = dict(DEFAULT_PORTS)
        for key, value in env.items():
            if key.startswith("INFERGRID_") and key.endswith("_PORT"):
                name = key[len("INFERGRID_") : -len("_PORT")].lower()
                ports[name] = _parse_port(key, value)
        java_home = env.get("INFERGRID_JAVA_HOME")
        platform_file = env.get("INFERGRID_PLATFORM_FILE")
        if platform_file:
            platform = Path(platform_file).absolute()
        elif profile == "single":
            platform = REPO_ROOT / "deploy" / "local" / "platform.yaml"
        else:
            platform = state_dir.absolute() / "platform.yaml"
        return cls(
            state_dir=state_dir.absolute(),
            cache_dir=cache_dir.absolute(),
            ports=ports,
            java_home=Path(java_home) if java_home else None,
            platform_file=platform,
            profile=profile,
        )

    def port(self, name: str) -> int:
        """Returns the port called `name` (see `stack.ports.DEFAULT_PORTS`)."""
        try:
            return self.ports[name]
        except KeyError:
            raise ConfigError(f"no port named {name!r}; set {port_env_var(name)}") from None

    def with_ports(self, ports: Mapping[str, int]) -> StackConfig:
        """Returns a copy whose ports are updated from `ports`."""
        return dataclasses.replace(self, ports={**self.ports, **ports})

    def to_env(self) -> dict[str, str]:
        """Returns the environment variables that reproduce this config in another process."""
        env = {
            "INFERGRID_STATE_DIR": str(self.state_dir),
            "INFERGRID_CACHE_DIR": str(self.cache_dir),
            **{port_env_var(name): str(port) for name, port in self.ports.items()},
        }
        if self.java_home is not None:
            env["INFERGRID_JAVA_HOME"] = str(self.java_home)
        env["INFERGRID_PLATFORM_FILE"] = str(self.platform_file)
        env[PROFILE_VARIABLE] = self.profile
        return env

    @property
    def is_cluster(self) -> bool:
        """True in the cluster profile."""
        return self.profile == "cluster"

    @property
    def deploy_dir(self) -> Path:
        """The checked-in configuration files of the servers."""
        return self.repo_root / "deploy" / "local"

    @property
    def log_dir(self) -> Path:
        """One log file per component."""
        return self.state_dir / "logs"

    @property
    def run_dir(self) -> Path:
        """One pid file per running component."""
        return self.state_dir / "run"

    @property
    def secrets_dir(self) -> Path:
        """The backends' generated credentials (mode 0700, one file per secret, mode 0600)."""
        return self.state_dir / "secrets"


def node_address(host: str, node: int) -> str:
    """The loopback address of node `node` (1-based) of a multi-node server: 127.0.0.1 → 127.0.0.<node>.

    Linux routes all of 127.0.0.0/8 to lo, so every node binds the same ports on its own address.
    """
    return str(ipaddress.ip_address(host) + (node - 1))


def _parse_port(variable: str, value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(f"{variable}={value!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{variable}={port} is outside 1..65535")
    return port


def secret_file(config: StackConfig, name: str) -> Path:
    """The file holding the stack's secret `name` (e.g. `redis-gateway`), generated once per state folder.

    A random 32-character password is written on first use with mode 0600 in `config.secrets_dir`
    (mode 0700) and kept: the backends and the services read the same file, and stop/start keeps it.
    Concurrent callers (the nodes of a cluster starting together) agree on one value: each writes a
    candidate and the first linked into place wins.
    """
    folder = config.secrets_dir
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    path = folder / name
    if not path.exists():
        candidate = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
        descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(24) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(candidate, path)
        candidate.unlink()
    return path


def read_secret(config: StackConfig, name: str) -> str:
    """The value of the stack's secret `name` (generated when missing, see `secret_file`)."""
    return secret_file(config, name).read_text().strip()


def login_env(
    config: StackConfig, backend: str, user: str, users: Collection[str], prefix: str
) -> dict[str, str]:
    """A client's login to `backend` (Redis, Cassandra, Kafka) as variables: `<prefix>_USERNAME` holds `user`,
    `<prefix>_PASSWORD_FILE` names its generated password file (the secret `<backend>-<user>`, `secret_file`).

    Raises:
        ValueError: `user` is not one of `users`.
    """
    if user not in users:
        raise ValueError(f"no {backend} user {user!r}; the users: {', '.join(users)}")
    password_file = secret_file(config, f"{backend.lower()}-{user}")
    return {f"{prefix}_USERNAME": user, f"{prefix}_PASSWORD_FILE": str(password_file)}


def replace_if_changed(path: Path, body: str) -> bool:
    """Writes `body` to `path` atomically (a temporary file renamed) unless it holds it already.

    Returns:
        True when the file was (re)written.
    """
    try:
        if path.read_text() == body:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(body)
    os.replace(temp, path)
    return True
