"""Redis: Debian's redis-server, run as our own process on loopback without persistence (it is a cache)."""

from __future__ import annotations

import shutil

import redis as redis_client

from stack.apt import ensure_command
from stack.component import Component
from stack.progress import Progress


class Redis(Component):
    """A single Redis server; ready when it answers PING."""

    kind = "redis"
    port_names = ("redis",)
    start_timeout_s = 20.0
    stop_timeout_s = 10.0

    def install(self, progress: Progress) -> None:
        """Installs Debian's redis-server when `redis-server` is not on PATH."""
        if shutil.which("redis-server") is None:
            progress.step(1, 1, "installing Debian package redis-server")
            ensure_command("redis-server", ["redis-server"], progress, self.install_log_path)

    def command(self) -> list[str]:
        """redis-server in the foreground, loopback only, nothing written to disk."""
        return [
            shutil.which("redis-server") or "redis-server",
            "--bind", self.host,
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--logfile", "",
        ]  # fmt: skip

    def ready(self) -> bool:
        """PING answered with PONG."""
        client = redis_client.Redis(
            host=self.host, port=self.port, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            return bool(client.ping())
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
