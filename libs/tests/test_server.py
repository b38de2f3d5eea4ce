"""The bootstrap over real gRPC channels: status mapping, health, reflection, metrics, drain, workers,
each on both transports (grpc.aio and the threaded grpc.server)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs import mtls
from libs.server import LIVENESS_SERVICE, GrpcService, Server, ServerConfig, build_server
from libs.testing import (
    free_port,
    health_status,
    reflected_services,
    spawn_module,
    stop_process,
    wait_serving,
)
from libs.tests.echo_service import FAILURES, SERVICE, build


@pytest.fixture(params=["aio", "threaded"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def echo(transport: str) -> AsyncIterator[tuple[Server, features_pb2_grpc.FeatureServiceStub]]:
    server = build(ServerConfig(port=0, drain_seconds=0, grace_seconds=0.5, transport=transport))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, features_pb2_grpc.FeatureServiceStub(channel)
    await server.stop(0, 0.5)


async def _code_of(stub: features_pb2_grpc.FeatureServiceStub, name: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name=name))
    return err.value.code(), err.value.details() or ""


@pytest.mark.parametrize(("name", "code", "message"), FAILURES)
async def test_typed_errors_become_statuses(echo: tuple[Server, object], name: str, code, message) -> None:  # type: ignore[no-untyped-def]
    _, stub = echo
    got_code, details = await _code_of(stub, name)  # type: ignore[arg-type]
    assert got_code == code
    assert details == message
    assert "hunter2" not in details


async def test_unknown_error_is_logged_once_with_traceback(
    echo: tuple[Server, features_pb2_grpc.FeatureServiceStub], caplog: pytest.LogCaptureFixture
) -> None:
    _, stub = echo
    await _code_of(stub, "boom")
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and "GetFeatureView" in errors[0].getMessage()


async def test_metrics_count_calls_by_code(echo: tuple[Server, features_pb2_grpc.FeatureServiceStub]) -> None:
    _, stub = echo
    labels = {"grpc_service": SERVICE, "grpc_method": "GetFeatureView"}

    def handled(code: str) -> float:
        return REGISTRY.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code}) or 0.0

    ok_before, bad_before = handled("OK"), handled("INVALID_ARGUMENT")
    await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="v"))
    await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="v"))
    await _code_of(stub, "invalid")
    # The interceptor counts a call when its handler returns, which may be just after the client has the
    # answer: give the server a moment on a busy machine.
    for _ in range(100):
        if handled("OK") >= ok_before + 2 and handled("INVALID_ARGUMENT") >= bad_before + 1:
            break
        await asyncio.sleep(0.01)
    assert handled("OK") == ok_before + 2
    assert handled("INVALID_ARGUMENT") == bad_before + 1
    assert (REGISTRY.get_sample_value("grpc_server_handling_seconds_count", labels) or 0) >= 3


async def test_health_and_reflection(echo: tuple[Server, features_pb2_grpc.FeatureServiceStub]) -> None:
    server, _ = echo
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for name in ("", SERVICE):
            assert await health_status(channel, name) == health_pb2.HealthCheckResponse.SERVING
        names = await reflected_services(channel)
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_readiness_gates_serving(transport: str) -> None:
    ready = asyncio.Event()

    async def check() -> bool:
        return ready.is_set()

    server = build(ServerConfig(port=0, readiness_interval_seconds=0.05, transport=transport))
    server.readiness = check
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await asyncio.sleep(0.2)
            assert await health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            ready.set()
            await asyncio.sleep(0.2)
            assert await health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0, 0.5)


async def test_background_work_is_cancelled_at_stop_before_the_stop_hooks(transport: str) -> None:
    started = asyncio.Event()
    events: list[str] = []

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("work cancelled")
            raise

    async def hook() -> None:
        events.append("stop hook")

    server = build(ServerConfig(port=0, transport=transport))
    task = server.run_in_background(work(), name="work")
    server.on_stop.append(hook)
    await server.start()
    await started.wait()
    await server.stop(0, 0.5)
    assert task.cancelled()
    assert events == ["work cancelled", "stop hook"]


def _spawn_echo(port: int, **env: str) -> subprocess.Popen[bytes]:
    return spawn_module("libs.tests.echo_service", {"ECHO_PORT": str(port), **env})


@pytest.mark.slow
async def test_sigterm_drains_not_serving_while_in_flight_call_completes(transport: str) -> None:
    port = free_port()
    proc = _spawn_echo(
        port,
        ECHO_DRAIN_SECONDS="1.5",
        ECHO_GRACE_SECONDS="5",
        ECHO_LOG_JSON="true",
        ECHO_TRANSPORT=transport,
    )
    try:
        await wait_serving(port, SERVICE, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            in_flight = asyncio.ensure_future(
                stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="slow:2.5"))
            )
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert await health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            view = await in_flight
            assert view.name == "slow:2.5"
        assert proc.wait(timeout=15) == 0
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert '"message": "echo received a stop signal"' in stderr
    finally:
        stop_process(proc)


@pytest.mark.slow
async def test_workers_share_one_port(transport: str) -> None:
    port = free_port()
    pin = transport == "threaded"  # both settings of pin_workers, one per transport
    proc = _spawn_echo(
        port,
        ECHO_WORKERS="2",
        ECHO_DRAIN_SECONDS="0",
        ECHO_GRACE_SECONDS="1",
        ECHO_TRANSPORT=transport,
        ECHO_PIN_WORKERS=str(pin).lower(),
    )
    try:
        await wait_serving(port, SERVICE, proc)
        pids: set[str] = set()
        deadline = time.monotonic() + 20
        # SO_REUSEPORT spreads new connections over the workers' sockets by hash.
        while len(pids) < 2 and time.monotonic() < deadline:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                view = await features_pb2_grpc.FeatureServiceStub(channel).GetFeatureView(
                    features_pb2.GetFeatureViewRequest(name="pid"), timeout=2
                )
                pids.add(view.description)
        assert len(pids) == 2, f"only saw worker pids {pids}"
        assert str(proc.pid) not in pids  # the supervisor serves nothing itself
        allowed = os.sched_getaffinity(proc.pid)
        placed = [os.sched_getaffinity(int(pid)) for pid in pids]
        if not pin:
            assert placed == [allowed, allowed]
        else:  # one CPU each, round robin over the supervisor's CPUs
            assert all(len(cpus) == 1 and cpus <= allowed for cpus in placed)
            assert len(placed[0] | placed[1]) == min(2, len(allowed))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        stop_process(proc)


async def test_liveness_is_serving_while_readiness_fails(transport: str) -> None:
    async def never_ready() -> bool:
        return False

    server = build(ServerConfig(port=0, readiness_interval_seconds=0.05, transport=transport))
    server.readiness = never_ready
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await asyncio.sleep(0.2)
            assert await health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await health_status(channel, LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0, 0.5)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"\x0a\x02\xff\xfe", "name: not valid UTF-8"),  # a string field holding bytes that are not text
        (b"\x0f\x00", "name: unsupported wire type 7"),
        (b"\x0a\x10ab", "name: truncated value"),
        (b"\x80", "message: truncated field tag"),
    ],
)
async def test_undecodable_request_is_invalid_argument_naming_the_field(
    echo: tuple[Server, features_pb2_grpc.FeatureServiceStub], body: bytes, field: str
) -> None:
    server, stub = echo
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.unary_unary(f"/{SERVICE}/GetFeatureView")  # bytes in, bytes out
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(body)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert field in details and "GetFeatureViewRequest" in details
    # Never grpc's own "Unexpected <class 'google.protobuf.message.DecodeError'>".
    assert "<class" not in details and "DecodeError" not in details
    assert (await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="ok"))).name == "ok"


async def test_def_methods_run_on_the_server_thread_and_async_ones_on_the_loop(
    echo: tuple[Server, features_pb2_grpc.FeatureServiceStub], transport: str
) -> None:
    _, stub = echo
    loop_thread = threading.current_thread().name  # the server was built in this test's loop
    listed = await stub.ListFeatureViews(features_pb2.ListFeatureViewsRequest())
    awaited = await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="thread"))
    assert awaited.description == f"{loop_thread} in a loop"
    if transport == "threaded":  # no hop to the loop: a handler thread of the server, without a loop
        assert listed.feature_views[0].description.startswith("grpc")
        assert listed.feature_views[0].description.endswith(" without a loop")
    else:
        assert listed.feature_views[0].description == f"{loop_thread} in a loop"


async def test_async_streams_run_on_the_loop_on_both_transports(transport: str) -> None:
    """An `async def` stream-stream method (requests in, each answered) and its errors, on both transports."""
    seen: list[str] = []

    async def shout(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for request in requests:
            seen.append(threading.current_thread().name)
            if request == b"boom":
                raise RuntimeError("a bug")
            yield request.upper()

    handler = grpc.method_handlers_generic_handler(
        "test.Shout", {"Shout": grpc.stream_stream_rpc_method_handler(shout)}
    )
    server = build_server(
        ServerConfig(port=0, transport=transport),
        [GrpcService("test.Shout", lambda s: s.add_generic_rpc_handlers((handler,)))],
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.stream_stream("/test.Shout/Shout")
            assert [reply async for reply in call(iter([b"a", b"bc"]))] == [b"A", b"BC"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [reply async for reply in call(iter([b"a", b"boom"]))]
    finally:
        await server.stop(0, 0.5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert set(seen) == {threading.current_thread().name}


async def test_a_call_past_its_deadline_cancels_its_handler(
    echo: tuple[Server, features_pb2_grpc.FeatureServiceStub],
) -> None:
    _, stub = echo
    labels = {"grpc_service": SERVICE, "grpc_method": "GetFeatureView", "grpc_code": "CANCELLED"}
    before = REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="slow:60"), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(500):  # the handler ends when cancelled, long before its 60 s sleep would
        if (REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0) > before:
            break
        await asyncio.sleep(0.02)
    assert REGISTRY.get_sample_value("grpc_server_handled_total", labels) == before + 1


async def test_mutual_tls_on_both_transports(transport: str, tmp_path: Path) -> None:
    """The port takes TLS credentials on either transport: the mesh's client certificate is served, and the
    handler sees the verified peer (`auth_context`); a client without a certificate is refused."""
    mesh = mtls.ensure_mesh_certificates(tmp_path / "mesh")
    server = build(
        ServerConfig(port=0, transport=transport),
        credentials=mtls.server_credentials(mesh.ca_cert, mesh.gateway_cert, mesh.gateway_key),
    )
    await server.start()
    address = f"localhost:{server.port}"
    try:
        client = mtls.channel_credentials(mesh.ca_cert, mesh.envoy_cert, mesh.envoy_key)
        async with grpc.aio.secure_channel(address, client) as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            view = await stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="peer"))
        assert view.description == "envoy"
        anonymous = grpc.ssl_channel_credentials(root_certificates=mesh.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(address, anonymous) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await features_pb2_grpc.FeatureServiceStub(channel).GetFeatureView(
                    features_pb2.GetFeatureViewRequest(name="peer"), timeout=5
                )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0, 0.5)
