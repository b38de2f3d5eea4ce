"""A minimal pipelined Redis client (RESP over one asyncio connection, replies parsed by hiredis).

The cache needs three commands (MGET, SET PX, DEL) on its hot path, and a
general-purpose client costs more Python per call than the rest of a feature
read. This one writes the commands of a call in one packet and matches replies
to callers in order. A call that is cancelled or times out drops the
connection (its reply could otherwise be handed to the next caller); the next
call reconnects.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis

Command = Sequence[bytes | str | int | float]


class RedisReplyError(Exception):
    """Redis answered a command with an error."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = (
            collections.deque()
        )
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def request(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self.closed or self._transport is None:
            future.set_exception(ConnectionError("Redis connection is closed"))
            return future
        self._waiting.append((len(commands), [], future))
        # hiredis' stub types the argument as a 1-tuple; any tuple of str/bytes/numbers is packed.
        self._transport.write(b"".join(hiredis.pack_command(tuple(c)) for c in commands))  # type: ignore[arg-type]
        return future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while self._waiting:
            reply = self._reader.gets()
            if reply is False:
                return
            count, replies, future = self._waiting[0]
            replies.append(reply)
            if len(replies) == count:
                self._waiting.popleft()
                if not future.done():
                    future.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self._waiting:
            _, _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"Redis connection lost: {exc}"))

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


class RespClient:
    """Pipelined commands over one lazily (re)connected connection to `redis://[user:password@]host:port/db`."""

    def __init__(self, url: str, connect_timeout_s: float = 1.0) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", ""):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r} (use redis://)")
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._db = int(parsed.path.lstrip("/") or 0)
        self._username = unquote(parsed.username) if parsed.username else None
        self._password = unquote(parsed.password) if parsed.password else None
        self._connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        async with self._lock:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            _, fresh = await asyncio.wait_for(
                loop.create_connection(_Protocol, self._host, self._port), self._connect_timeout_s
            )
            setup: list[Command] = []
            if self._password is not None:
                setup.append(
                    ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
                )
            if self._db:
                setup.append(("SELECT", self._db))
            if setup:
                try:
                    _raise_errors(await asyncio.wait_for(fresh.request(setup), self._connect_timeout_s))
                except BaseException:
                    fresh.abort()
                    raise
            self._protocol = fresh
            return fresh

    async def execute(self, *commands: Command) -> list[Any]:
        """Sends the commands in one write and returns their replies (errors raise RedisReplyError)."""
        protocol = await self._connection()
        future = protocol.request(commands)
        try:
            replies = await future
        except BaseException:
            if not future.done():
                protocol.abort()
            raise
        _raise_errors(replies)
        return replies

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.abort()
            self._protocol = None


def _raise_errors(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
