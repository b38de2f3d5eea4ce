"""Redis: Debian's redis-server, run as our own process on loopback; alone without persistence (a cache).

The cluster profile runs a primary with an append-only file (`appendfsync everysec`) and a replica of it
(`replicaof`) on the next loopback address; see `Redis` and the README's cluster section for why.

Every client authenticates (Redis ACLs): each service has a user of its own that may run only the
commands it needs on only its own key prefixes (`SERVICE_USERS`); `default` (the stack's and the tests'
administrator) has a password; the cluster's replica logs in to its primary as `replica`. The passwords are
generated once into the state folder (`stack.config.secret_file`, mode 0600); the ACL file holds only
their SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import redis as redis_client

from libs.config import url_with_credentials
from stack.apt import ensure_command
from stack.component import Component
from stack.config import StackConfig, login_env, node_address, read_secret, secret_file
from stack.progress import Progress

ADMIN_USER = "default"
REPLICATION_USER = "replica"
# What every service user may run to connect (AUTH and HELLO need no permission).
_CONNECTION_COMMANDS = ("ping", "select", "echo", "quit", "reset", "client|setname")
# The token-bucket scripts (libs/ratelimit.py): EVALSHA, SCRIPT LOAD on NOSCRIPT, and what they call.
_RATE_LIMIT_COMMANDS = ("evalsha", "eval", "script|load", "time", "hmget", "hset", "pexpire")
# The services' Redis users: the key patterns each may touch and the commands it may run. The prefixes
# are the services' defaults (services/features/config.py `cache_key_prefix`, services/gateway/config.py
# `response_cache_key_prefix` and `admission_key_prefix`, services/edge/config.py `key_prefix`).
SERVICE_USERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # The feature cache (services/features/cache.py): MGET, SET PX, DEL.
    "features": (("ifs:*",), ("mget", "set", "del")),
    # The response cache (GET, SET PX) and, when admission is in the gateway, the rate-limit buckets.
    "gateway": (("igw:*", "infergrid:rl:*"), ("get", "set", *_RATE_LIMIT_COMMANDS)),
    # The rate-limit service's buckets.
    "edge": (("infergrid:rl:*",), _RATE_LIMIT_COMMANDS),
}


def password_secret(user: str) -> str:
    """The name of the stack secret holding Redis user `user`'s password."""
    return f"redis-{user}"


def password_file(config: StackConfig, user: str) -> Path:
    """The file holding Redis user `user`'s password (generated on first use)."""
    return secret_file(config, password_secret(user))


def credential_env(config: StackConfig, user: str, variable_prefix: str) -> dict[str, str]:
    """A service's Redis credentials as its variables: `<prefix>_USERNAME` and `<prefix>_PASSWORD_FILE`.

    Example: `credential_env(config, "edge", "INFERGRID_EDGE_REDIS")`.
    """
    return login_env(config, "Redis", user, SERVICE_USERS, variable_prefix)


def _sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def acl_lines(config: StackConfig) -> list[str]:
    """The ACL file: `default` (everything, with a password), `replica` (replication only), then one user
    per service limited to its key patterns and commands; no channels for anyone but `default`."""
    lines = [
        f"user {ADMIN_USER} on #{_sha256(read_secret(config, password_secret(ADMIN_USER)))} ~* &* +@all",
        f"user {REPLICATION_USER} on #{_sha256(read_secret(config, password_secret(REPLICATION_USER)))} "
        "resetchannels -@all +psync +replconf +ping",
    ]
    for user, (patterns, commands) in SERVICE_USERS.items():
        keys = " ".join(f"~{pattern}" for pattern in patterns)
        allowed = " ".join(f"+{command}" for command in (*_CONNECTION_COMMANDS, *commands))
        digest = _sha256(read_secret(config, password_secret(user)))
        lines.append(f"user {user} on #{digest} resetkeys {keys} resetchannels -@all {allowed}")
    return lines


def _write_private(path: Path, text: str) -> None:
    """Writes `text` to `path` readable by its owner only (created 0600, replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.unlink(missing_ok=True)
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temp, path)


class Redis(Component):
    """A Redis server; ready when it answers PING (a replica: once its link to the primary is up).

    Alone (the default) nothing is written to disk. `appendonly=True` (the cluster's primary) keeps an
    append-only file fsynced every second, so the rate limiter's token buckets survive a restart (losing
    at most a second of charges) and a replica never resyncs from an emptied primary. `replica_of` (a
    Redis component) makes this server a read-only replica of it, on loopback address `node`
    (127.0.0.<node>, the same port), itself without persistence.
    """

    kind = "redis"
    port_names = ("redis",)
    start_timeout_s = 20.0
    stop_timeout_s = 10.0

    def __init__(
        self,
        config: StackConfig,
        *,
        name: str | None = None,
        ports: Mapping[str, int] | None = None,
        node: int = 1,
        appendonly: bool = False,
        replica_of: Redis | None = None,
    ) -> None:
        """See `Component.__init__`; `node`, `appendonly` and `replica_of` as in the class docstring."""
        self.node = node
        self.appendonly = appendonly
        self.replica_of = replica_of
        super().__init__(config, name=name, ports=ports)

    @property
    def host(self) -> str:
        """127.0.0.<node> (the stack's address for node 1)."""
        return node_address(self.config.host, self.node)

    def install(self, progress: Progress) -> None:
        """Installs Debian's redis-server when `redis-server` is not on PATH."""
        if shutil.which("redis-server") is None:
            progress.step(1, 1, "installing Debian package redis-server")
            ensure_command("redis-server", ["redis-server"], progress, self.install_log_path)

    @property
    def acl_file(self) -> Path:
        """The users and their rights (`acl_lines`), rendered before each start."""
        return self.data_dir / "users.acl"

    @property
    def conf_file(self) -> Path:
        """Settings that hold secrets (the replica's `masterauth`): a file, not the command line."""
        return self.data_dir / "redis.conf"

    def prepare(self) -> None:
        """Writes the ACL file and redis.conf (mode 0600), generating the passwords on first start."""
        super().prepare()
        _write_private(self.acl_file, "\n".join(acl_lines(self.config)) + "\n")
        conf = [f"aclfile {self.acl_file}"]
        if self.replica_of is not None:
            password = read_secret(self.config, password_secret(REPLICATION_USER))
            conf += [f"masteruser {REPLICATION_USER}", f'masterauth "{password}"']
        _write_private(self.conf_file, "\n".join(conf) + "\n")

    def command(self) -> list[str]:
        """redis-server in the foreground, loopback only; persistence and replication as configured."""
        command = [
            shutil.which("redis-server") or "redis-server",
            str(self.conf_file),
            "--bind", self.host,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--save", "",
            "--dir", str(self.data_dir),
            "--logfile", "",
            # The rate limiter's token buckets share this Redis with the caches: never evict (an erased
            # bucket comes back full); no maxmemory is set, so nothing is refused either.
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if self.appendonly:
            command += ["--appendonly", "yes", "--appendfsync", "everysec"]
            # A replica's full sync streams the snapshot over the socket at once (no RDB file, no 5 s wait).
            command += ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        else:
            command += ["--appendonly", "no"]
        if self.replica_of is not None:
            command += [
                "--replicaof", self.replica_of.host, str(self.replica_of.port),
                "--replica-read-only", "yes",
                # Loads the primary's streamed snapshot straight into memory: no RDB file on this side.
                "--repl-diskless-load", "on-empty-db",
            ]  # fmt: skip
        return command

    def ready(self) -> bool:
        """PING answered with PONG; a replica also reports its link to the primary up."""
        client = redis_client.Redis(
            host=self.host,
            port=self.port,
            username=ADMIN_USER,
            password=self.admin_password,
            socket_timeout=1,
            socket_connect_timeout=1,
        )
        try:
            if not client.ping():
                return False
            if self.replica_of is None:
                return True
            info = client.info("replication")
            return bool(info.get("master_link_status") == "up")
        except redis_client.RedisError:
            return False
        finally:
            client.close()

    @property
    def admin_password(self) -> str:
        """The password of `default`, the administrator (the stack's probes, the tests)."""
        return read_secret(self.config, password_secret(ADMIN_USER))

    @property
    def address_url(self) -> str:
        """redis://host:port/0 without credentials (to print; a client connecting with it is refused)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def url(self) -> str:
        """redis://default:<password>@host:port/0, the administrator's URL for `redis.Redis.from_url`.

        It holds a secret: for clients (the tests, the benchmarks), never for a log or a service's config.
        """
        return url_with_credentials(self.address_url, ADMIN_USER, self.admin_password)

    def endpoints(self) -> dict[str, str]:
        """The Redis URL (without credentials) and where the users' passwords are."""
        return {"redis": self.address_url, "passwords": str(self.config.secrets_dir / "redis-<user>")}
