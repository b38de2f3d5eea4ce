"""Endpoint discovery: a target string resolves to the sorted `host:port` endpoints of an upstream's replicas.

Target syntax (a comma-separated list of any of these; the union is served):

- `10.0.0.7:50051`, `[::1]:50051`: an IP literal is its own endpoint.
- `inference-headless:8001`, `dns:///inference-headless:8001`, `dns:inference-headless:8001`: every
  A record of the name (a Kubernetes headless Service's ready pods), re-resolved on every poll.
- `file:/abs/endpoints.json` (or `file:relative.json`, against the caller's base folder): a JSON file
  `{"endpoints": ["127.0.0.1:50051", ...]}` that a supervisor rewrites atomically with the READY
  replicas. A missing file is no endpoints (logged once); a malformed one keeps the last good list.
- `inproc:features`: the server published under that name in this process (`libs.inproc`), called
  without a network hop; it is its own endpoint.

`EndpointWatcher` re-resolves its targets every interval in a background task and calls `on_change`
only when the set changes. A name that does not exist (NXDOMAIN) resolves to nothing; any other DNS
failure keeps the name's last good addresses, so a flaky resolver never empties a healthy pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from libs.inproc import PREFIX as LOCAL_PREFIX

log = logging.getLogger(__name__)

DNS_PREFIXES = ("dns:///", "dns:")
FILE_PREFIX = "file:"
# getaddrinfo's answers for a name that does not exist (as opposed to a resolver that failed).
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class TargetError(ValueError):
    """A target string does not parse; the message names the bad part."""


@dataclass(frozen=True)
class HostPort:
    """`host:port`: an IP literal (`is_ip`) or a DNS name."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        return is_ip_literal(self.host)

    def address(self, ip: str | None = None) -> str:
        """`host:port` (`ip` instead of the host when given), IPv6 in brackets."""
        host = ip or self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.address()


@dataclass(frozen=True)
class FileTarget:
    """A JSON file listing endpoints, rewritten by whoever knows the ready replicas."""

    path: Path

    def __str__(self) -> str:
        return f"{FILE_PREFIX}{self.path}"


@dataclass(frozen=True)
class LocalTarget:
    """A server in this process (`libs.inproc`): its address is the target itself."""

    name: str

    def __str__(self) -> str:
        return f"{LOCAL_PREFIX}{self.name}"


Target = HostPort | FileTarget | LocalTarget


def is_ip_literal(host: str) -> bool:
    """True when `host` is an IPv4 or IPv6 address, not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_host_port(text: str) -> HostPort:
    """Parses `host:port` or `[v6]:port` (a `dns:` prefix allowed).

    Raises:
        TargetError: Not a host and a port in 1..65535.
    """
    raw = text.strip()
    raw = next((raw[len(prefix) :] for prefix in DNS_PREFIXES if raw.startswith(prefix)), raw)
    host, sep, port = raw.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    valid_port = port.isdigit() and 0 < int(port) < 65536
    if not (sep and host and valid_port) or (":" in host and not is_ip_literal(host)):
        raise TargetError(f"expected host:port, got {text!r}")
    return HostPort(host, int(port))


def parse_targets(spec: str, base_dir: Path | None = None) -> tuple[Target, ...]:
    """Parses a comma-separated target list (see the module docstring).

    Args:
        spec: The target string.
        base_dir: Folder a relative `file:` path resolves against; the working directory when None.

    Raises:
        TargetError: An empty list or a malformed entry; names the entry.
    """
    targets: list[Target] = []
    for part in spec.split(","):
        entry = part.strip()
        if not entry:
            continue
        if entry.startswith(FILE_PREFIX):
            raw = entry[len(FILE_PREFIX) :].removeprefix("//")  # file:///abs/path
            if not raw:
                raise TargetError(f"expected file:<path>, got {entry!r}")
            path = Path(raw)
            if not path.is_absolute():
                path = (base_dir or Path.cwd()) / path
            targets.append(FileTarget(path))
        elif entry.startswith(LOCAL_PREFIX):
            name = entry[len(LOCAL_PREFIX) :]
            if not name:
                raise TargetError(f"expected {LOCAL_PREFIX}<name>, got {entry!r}")
            targets.append(LocalTarget(name))
        else:
            targets.append(parse_host_port(entry))
    if not targets:
        raise TargetError(f"expected at least one target, got {spec!r}")
    return tuple(targets)


class Resolver:
    """Resolves targets to endpoints, remembering the last good answer of each name and file."""

    def __init__(self) -> None:
        self._dns: dict[HostPort, tuple[str, ...]] = {}
        self._files: dict[Path, tuple[tuple[int, int, int], tuple[str, ...]]] = {}
        self._warned: set[object] = set()

    async def resolve(self, targets: Sequence[Target]) -> tuple[str, ...]:
        """The sorted, de-duplicated endpoints of all targets."""
        out: set[str] = set()
        for target in targets:
            if isinstance(target, FileTarget):
                out.update(await self._file(target.path))
            elif isinstance(target, LocalTarget):
                out.add(str(target))
            elif target.is_ip:
                out.add(target.address())
            else:
                out.update(await self._name(target))
        return tuple(sorted(out))

    def _warn_once(self, key: object, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    async def _name(self, target: HostPort) -> tuple[str, ...]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(target.host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError as exc:  # socket.gaierror included
            if isinstance(exc, socket.gaierror) and exc.errno in _NO_SUCH_NAME:
                self._warn_once(("nxdomain", target), "%s does not resolve: no endpoints", target.host)
                self._dns[target] = ()
                return ()
            last = self._dns.get(target, ())
            self._warn_once(("dns", target), "resolving %s failed (%s); keeping %s", target.host, exc, last)
            return last
        addresses = tuple(sorted({target.address(str(info[4][0])) for info in infos}))
        self._dns[target] = addresses
        self._warned.discard(("nxdomain", target))
        self._warned.discard(("dns", target))
        return addresses

    async def _file(self, path: Path) -> tuple[str, ...]:
        try:
            st = os.stat(path)
        except OSError:
            self._warn_once(("missing", path), "endpoint file %s does not exist: no endpoints", path)
            self._files.pop(path, None)
            return ()
        self._warned.discard(("missing", path))
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        known = self._files.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        last = known[1] if known is not None else ()
        try:
            endpoints = _read_endpoint_file(path)
        except (OSError, ValueError) as exc:
            log.error("endpoint file %s rejected, keeping %s: %s", path, list(last), exc)
            self._files[path] = (stamp, last)
            return last
        self._files[path] = (stamp, endpoints)
        return endpoints


def _read_endpoint_file(path: Path) -> tuple[str, ...]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("endpoints"), list):
        raise ValueError('expected {"endpoints": ["host:port", ...]}')
    out = []
    for i, entry in enumerate(data["endpoints"]):
        if not isinstance(entry, str):
            raise ValueError(f"endpoints[{i}]: expected a string, got {entry!r}")
        try:
            parsed = parse_host_port(entry)
        except TargetError as exc:
            raise ValueError(f"endpoints[{i}]: {exc}") from None
        out.append(parsed.address())
    return tuple(sorted(set(out)))


OnChange = Callable[[tuple[str, ...]], Awaitable[None] | None]


class EndpointWatcher:
    """Re-resolves targets every `interval_s` and reports a changed endpoint set to `on_change`.

    Call `refresh()` once before serving (the first answer), then run `run()` as a background task
    for the server's lifetime (cancel it on stop).
    """

    def __init__(
        self,
        targets: str | Sequence[Target],
        on_change: OnChange,
        interval_s: float = 1.0,
        *,
        base_dir: Path | None = None,
        name: str = "",
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.targets: tuple[Target, ...] = (
            parse_targets(targets, base_dir) if isinstance(targets, str) else tuple(targets)
        )
        self.name = name or ",".join(str(t) for t in self.targets)
        self.current: tuple[str, ...] | None = None
        self._on_change = on_change
        self._interval = interval_s
        self._resolver = Resolver()

    def set_targets(self, targets: Sequence[Target]) -> None:
        """Replaces the targets (e.g. the platform file changed); the next refresh resolves them."""
        self.targets = tuple(targets)

    async def refresh(self) -> bool:
        """Resolves now; calls `on_change` and returns True when the set differs from the last one."""
        endpoints = await self._resolver.resolve(self.targets)
        if endpoints == self.current:
            return False
        before, self.current = self.current, endpoints
        log.info(
            "endpoints of %s: %s (were %s)",
            self.name,
            list(endpoints),
            list(before) if before is not None else "unknown",
            extra={"upstream": self.name, "endpoints": list(endpoints)},
        )
        result = self._on_change(endpoints)
        if asyncio.iscoroutine(result):
            await result
        return True

    async def run(self) -> None:
        """Polls until cancelled; a failing poll is logged and the next one tries again."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("resolving the endpoints of %s failed", self.name)
