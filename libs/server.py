"""The one gRPC server bootstrap: health, reflection, error/metric/span wrapping, readiness, graceful drain, workers.

A service builds its servicers and hands them to `build_server`; its `__main__`
is one call of `main`, which reads its config and calls `serve`, which runs the
server until SIGTERM/SIGINT and then drains:
health flips to NOT_SERVING (load balancers stop sending), in-flight calls
finish within the grace period, and the process exits. With `workers > 1` the
process becomes a supervisor of that many worker processes sharing one port
through SO_REUSEPORT (grpc's multiprocessing pattern), each with its own event
loop, and serves their aggregated Prometheus metrics.

The transport is a choice (`ServerConfig.transport`): "aio" serves on grpc.aio, every handler on the
event loop; "threaded" serves on grpc.server with a pool of `threads` handler threads, where a servicer's
plain `def` methods run directly on the server thread and its `async def` methods on the event loop the
server was built in (the one `run_in_background` uses). Health, reflection, readiness, drain, limits and
the handler wrapper (`libs.interceptors`: errors, metrics, spans) are the same on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import grpc
from grpc_health.v1 import health as health_sync
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from libs import inproc
from libs.config import Bounded, ConfigError, load_config_or_exit, redacted, setting
from libs.interceptors import ServerInterceptor
from libs.telemetry import PROMETHEUS_MULTIPROC_ENV, Telemetry, TelemetryConfig, setup_telemetry

log = logging.getLogger(__name__)

WORKER_ENV = "INFERGRID_WORKER_INDEX"
# A health "service" that is SERVING while the process runs, whatever its backends do: the
# liveness probe asks for it, so an outage of Cassandra makes pods unready, never restarts them.
LIVENESS_SERVICE = "infergrid.liveness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

ReadinessCheck = Callable[[], Awaitable[bool]]
# `ServerConfig.transport`: grpc.aio, or grpc.server with handler threads (see the module docstring).
TRANSPORTS = ("aio", "threaded")


@dataclass(frozen=True)
class ServerConfig(Bounded):
    """Settings every gRPC service has; read with the service's own prefix."""

    # Bind address: loopback locally, 0.0.0.0 in a pod.
    host: str = "127.0.0.1"
    # 0 picks a free port (tests); a fixed port is required when workers > 1.
    port: int = setting(0, minimum=0, maximum=65535)
    # Worker processes sharing the port via SO_REUSEPORT; 1 runs in this process.
    workers: int = setting(1, minimum=1)
    # With workers > 1: worker i runs only on the i-th CPU this process may use (round robin), so a
    # threaded worker never hands its GIL across cores (+39 % CPU per call unpinned on 2 cores, see
    # bench/results/latest/analysis.md, "Scaling").
    pin_workers: bool = False
    # After SIGTERM: seconds of NOT_SERVING while still answering, so balancers move away.
    drain_seconds: float = 5.0
    # Then: seconds in-flight calls get to finish before they are cancelled.
    grace_seconds: float = 10.0
    max_message_bytes: int = 64 * 1024 * 1024
    # Calls beyond this many concurrent ones are rejected with RESOURCE_EXHAUSTED; 0: no limit.
    max_concurrent_rpcs: int = 0
    # How often backend readiness is re-checked for the health status.
    readiness_interval_seconds: float = 2.0
    # "aio" (grpc.aio: handlers on the event loop) or "threaded" (grpc.server: handler threads).
    transport: str = setting("aio", choices=TRANSPORTS)
    # The threaded transport's handler threads (made as needed): calls beyond this many at once wait for
    # one, health checks too, so it is well above the calls a replica holds at once.
    threads: int = setting(128, minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers > 1 and self.port == 0:
            raise ValueError("a fixed port is required when workers > 1 (workers share it)")


@dataclass(frozen=True)
class GrpcService:
    """A servicer to serve: its full service name and the generated `add_..._to_server` call."""

    name: str
    register: Callable[[grpc.aio.Server], None]

    @classmethod
    def of(cls, name: str, add_to_server: Callable[[Any, Any], None], servicer: object) -> GrpcService:
        """The service `name` served by `servicer` through its generated `add_..._to_server`."""
        return cls(name, lambda server: add_to_server(servicer, server))


class _ThreadedHealth:
    """The threaded transport's (sync) health servicer behind the aio one's awaitable methods."""

    def __init__(self) -> None:
        self.servicer = health_sync.HealthServicer()

    async def set(self, service: str, status: int) -> None:
        self.servicer.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self.servicer.enter_graceful_shutdown()


@dataclass
class Server:
    """A built (not yet started) server, its port and its health state."""

    grpc_server: grpc.aio.Server | grpc.Server
    port: int
    health: health_aio.HealthServicer | _ThreadedHealth
    service_names: tuple[str, ...]
    readiness: ReadinessCheck | None = None
    readiness_interval: float = 2.0
    # Every method handler as wrapped (errors, metrics, spans), by "/package.Service/Method": what
    # `libs.inproc.publish` serves to callers in this process.
    handlers: dict[str, grpc.RpcMethodHandler] = field(default_factory=dict)
    transport: str = "aio"
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run after the gRPC server started (e.g. a second front door of the same service).
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _readiness_task: asyncio.Task[None] | None = None
    _stopping: bool = False
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def publish(self, name: str) -> None:
        """Serves this server's methods to callers in this process as `inproc:<name>` (`libs.inproc`),
        beside its port.

        Raises:
            ValueError: The server is on the threaded transport (its handlers would block the caller's loop).
        """
        if self.transport != "aio":
            raise ValueError(f"in-process calls to {name} need the aio transport, not {self.transport!r}")
        inproc.publish(name, self.handlers)

    def run_in_background(self, work: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Runs `work` for the server's lifetime: `stop` cancels it (and waits) before the on_stop hooks."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def start(self) -> None:
        """Starts serving; health turns SERVING once readiness passes (at once without a check).

        The liveness name (`LIVENESS_SERVICE`) is SERVING from the start until shutdown.
        """
        if isinstance(self.grpc_server, grpc.aio.Server):
            await self.grpc_server.start()
        else:
            self.grpc_server.start()
        for hook in self.on_start:
            await hook()
        await self.health.set(LIVENESS_SERVICE, _SERVING)
        if self.readiness is None:
            await self._set_all(_SERVING)
        else:
            self._readiness_task = asyncio.create_task(self._watch_readiness(), name="readiness")

    @property
    def stopping(self) -> bool:
        """True from the stop signal on (draining): other front doors report not ready too."""
        return self._stopping

    async def _set_all(self, status: int) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def _watch_readiness(self) -> None:
        assert self.readiness is not None
        current: int | None = None
        while not self._stopping:
            try:
                ok = await asyncio.wait_for(self.readiness(), timeout=max(self.readiness_interval, 1.0))
            except Exception as exc:  # a failing check means not ready, never a dead watcher
                log.warning("readiness check failed: %s", exc)
                ok = False
            status = _SERVING if ok else _NOT_SERVING
            if status != current and not self._stopping:
                await self._set_all(status)
                log.info("health %s", "SERVING" if ok else "NOT_SERVING")
                current = status
            await asyncio.sleep(self.readiness_interval)

    async def stop(self, drain_seconds: float, grace_seconds: float) -> None:
        """Drains: NOT_SERVING for `drain_seconds` while answering, then stops with a grace period."""
        self._stopping = True
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness_task
        await self.health.enter_graceful_shutdown()
        log.info("draining: NOT_SERVING for %.1fs, then %.1fs grace", drain_seconds, grace_seconds)
        if drain_seconds > 0:
            await asyncio.sleep(drain_seconds)
        if isinstance(self.grpc_server, grpc.aio.Server):
            await self.grpc_server.stop(grace_seconds)
        else:  # the loop keeps running the calls' coroutines meanwhile
            await asyncio.to_thread(self.grpc_server.stop(grace_seconds).wait)
        background = list(self._background)
        for task in background:
            task.cancel()
        for task in background:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("background task %s failed", task.get_name())
        for hook in self.on_stop:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")


class _Registrar:
    """The gRPC server as the services see it while they register: their handlers go in wrapped."""

    def __init__(self, server: grpc.aio.Server | grpc.Server, wrapper: ServerInterceptor) -> None:
        self._server, self._wrapper = server, wrapper
        # The wrapped handlers by "/package.Service/Method": what `libs.inproc` calls in process.
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(self._wrapper.generic(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        wrap = self._wrapper.wrap
        wrapped = {name: wrap(h, f"/{service}/{name}") for name, h in handlers.items()}
        self.handlers.update({f"/{service}/{name}": h for name, h in wrapped.items()})
        self._server.add_registered_method_handlers(service, wrapped)


def build_server(
    config: ServerConfig,
    services: Sequence[GrpcService],
    *,
    telemetry: Telemetry | None = None,
    readiness: ReadinessCheck | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> Server:
    """Creates a gRPC server with the services, health, reflection, each handler wrapped (errors, metrics, spans).

    On the threaded transport (`config.transport`), call it inside the event loop that is to run the
    servicers' `async def` methods.

    Args:
        config: Bind address, limits and shutdown timings.
        services: The service's own servicers.
        telemetry: Server spans when tracing is on (`libs.interceptors`).
        readiness: Checked every `readiness_interval_seconds`; health is SERVING only while it passes.
        credentials: TLS server credentials for the port (e.g. `libs.mtls.server_credentials`); None: plaintext.

    Returns:
        The server, bound but not started, with the port it bound.
    """
    threaded = config.transport == "threaded"
    wrapper = ServerInterceptor(
        telemetry.server_tracer() if telemetry is not None else None,
        asyncio.get_running_loop() if threaded else None,
    )
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
        # Let clients keep idle connections alive through Envoy and balancers.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]
    limit = config.max_concurrent_rpcs or None
    server: grpc.aio.Server | grpc.Server
    health: health_aio.HealthServicer | _ThreadedHealth
    if threaded:
        pool = ThreadPoolExecutor(config.threads, thread_name_prefix="grpc")
        server = grpc.server(pool, options=options, maximum_concurrent_rpcs=limit)
        health = _ThreadedHealth()
    else:
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=limit)
        health = health_aio.HealthServicer()
    recorder = _Registrar(server, wrapper)
    registrar = cast(grpc.aio.Server, recorder)
    for service in services:
        service.register(registrar)
    health_pb2_grpc.add_HealthServicer_to_server(
        health.servicer if isinstance(health, _ThreadedHealth) else health, registrar
    )
    names = tuple(s.name for s in services)
    reflected = (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.ReflectionServicer(reflected)
        if threaded
        else reflection.aio.ReflectionServicer(reflected),
        registrar,
    )
    host = f"[{config.host}]" if ":" in config.host else config.host
    address = f"{host}:{config.port}"
    port = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    return Server(
        grpc_server=server,
        port=port,
        health=health,
        service_names=names,
        readiness=readiness,
        readiness_interval=config.readiness_interval_seconds,
        handlers=recorder.handlers,
        transport=config.transport,
    )


ServerFactory = Callable[[Telemetry], Awaitable[Server]]


async def run_until_signal(server: Server, config: ServerConfig, name: str) -> None:
    """Starts `server`, waits for SIGTERM or SIGINT, then drains and stops it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("%s serving on %s:%d", name, config.host, server.port, extra={"port": server.port})
    await stop.wait()
    log.info("%s received a stop signal", name)
    await server.stop(config.drain_seconds, config.grace_seconds)
    log.info("%s stopped", name)


def serve(
    name: str,
    config: ServerConfig,
    telemetry_config: TelemetryConfig,
    factory: ServerFactory,
    environ: Mapping[str, str],
) -> None:
    """Runs a service: in this process, or as a supervisor of `config.workers` worker processes.

    Args:
        name: The service name (logs, traces, metrics).
        config: The server settings.
        telemetry_config: Logging, tracing and metrics settings.
        factory: Builds the server (and its dependencies) inside the running event loop.
        environ: The process environment, used to tell a worker from its supervisor.
    """
    is_worker = WORKER_ENV in environ
    if config.workers > 1 and not is_worker:
        telemetry = setup_telemetry(name, telemetry_config, serve_metrics=False)
        _supervise_workers(name, config, telemetry_config, environ)
        return
    if is_worker and config.pin_workers:  # before any thread starts: they all inherit it
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(environ[WORKER_ENV]) % len(cpus)]})
    telemetry = setup_telemetry(name, telemetry_config, serve_metrics=not is_worker)

    async def _main() -> None:
        server = await factory(telemetry)
        await run_until_signal(server, config, name)

    try:
        asyncio.run(_main())
    finally:
        telemetry.shutdown()


class ServiceConfig(Protocol):
    """What `main` needs of a service's config dataclass: its server and telemetry sections."""

    @property
    def server(self) -> ServerConfig: ...

    @property
    def telemetry(self) -> TelemetryConfig: ...


C = TypeVar("C", bound=ServiceConfig)


def main(
    name: str,
    config_class: type[C],
    create_server: Callable[[C, Telemetry], Awaitable[Server]],
    *,
    prepare: Callable[[C, str | None], C] | None = None,
) -> None:
    """Runs service `name` as `python -m services.<name>` does: the whole of every `__main__`.

    Reads `config_class` from the `INFERGRID_<NAME>_*` environment variables, logs it once (redacted)
    and serves the server `create_server` builds (`serve`: workers, telemetry, drain on SIGTERM). A
    missing or malformed value, in the environment or found by `create_server` (a `ConfigError`),
    exits with status 2 and a message naming the variable.

    Args:
        name: The service's name (`gateway`): its variables' prefix, logs, traces and metrics.
        config_class: The service's frozen config dataclass.
        create_server: Builds the server, bound and not started, inside the event loop.
        prepare: Checks the loaded config beyond its types (raising `ConfigError`) and adjusts it for
            this process, given the worker's index (None: the only process, or the workers' supervisor).
    """
    config = load_config_or_exit(config_class, os.environ, f"INFERGRID_{name.upper()}_")

    async def factory(telemetry: Telemetry) -> Server:
        log.info("config", extra={"config": redacted(config)})
        return await create_server(config, telemetry)

    try:
        if prepare is not None:
            config = prepare(config, os.environ.get(WORKER_ENV))
        serve(name, config.server, config.telemetry, factory, os.environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _supervise_workers(
    name: str, config: ServerConfig, telemetry_config: TelemetryConfig, environ: Mapping[str, str]
) -> None:
    """Starts worker copies of this command, restarts crashed ones, forwards SIGTERM/SIGINT."""
    from libs.telemetry import start_metrics_server

    metrics_dir = tempfile.mkdtemp(prefix=f"infergrid-{name}-metrics-")
    env = dict(environ)
    env[PROMETHEUS_MULTIPROC_ENV] = metrics_dir
    os.environ[PROMETHEUS_MULTIPROC_ENV] = metrics_dir
    if telemetry_config.metrics_port:
        start_metrics_server(telemetry_config.metrics_port, telemetry_config.metrics_host)
    argv = [sys.executable, *sys.orig_argv[1:]]
    stopping = False

    def _spawn(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env={**env, WORKER_ENV: str(index)})

    workers = {i: _spawn(i) for i in range(config.workers)}
    log.info("%s supervising %d workers on port %d", name, config.workers, config.port)

    def _forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    deadline: float | None = None
    while True:
        alive = {i: p for i, p in workers.items() if p.poll() is None}
        if stopping:
            deadline = deadline or time.monotonic() + config.drain_seconds + config.grace_seconds + 5
            if not alive:
                break
            if time.monotonic() > deadline:
                for proc in alive.values():
                    proc.kill()
        else:
            for i, proc in workers.items():
                if proc.poll() is not None:
                    log.error("worker %d exited with %s; restarting it", i, proc.returncode)
                    time.sleep(0.5)
                    workers[i] = _spawn(i)
        time.sleep(0.2)
    log.info("%s workers stopped", name)
