"""Redis: Debian's redis-server, run as our own process on loopback; alone without persistence (a cache).

The cluster profile runs a primary with an append-only file (`appendfsync everysec`) and a replica of it
(`replicaof`) on the next loopback address; see `Redis` and the README's cluster section for why.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping

import redis as redis_client

from stack.apt import ensure_command
from stack.component import Component
from stack.config import StackConfig, node_address
from stack.progress import Progress


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

    def command(self) -> list[str]:
        """redis-server in the foreground, loopback only; persistence and replication as configured."""
        command = [
            shutil.which("redis-server") or "redis-server",
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
            host=self.host, port=self.port, socket_timeout=1, socket_connect_timeout=1
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
    def url(self) -> str:
        """redis://host:port/0, for `redis.Redis.from_url`."""
        return f"redis://{self.host}:{self.port}/0"

    def endpoints(self) -> dict[str, str]:
        """The Redis URL."""
        return {"redis": self.url}
