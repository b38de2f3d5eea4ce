"""Helpers for tests of services built on the shared bootstrap (real channels, real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from libs.checkout import REPO_ROOT, checkout_env
from libs.server import Server


def free_port() -> int:
    """A port that was free on loopback a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def health_status(channel: grpc.aio.Channel, service: str = "", timeout: float = 2.0) -> int:
    """The grpc.health.v1 status of `service` ("" is the whole server)."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout
    )
    return int(reply.status)


async def reflected_services(channel: grpc.aio.Channel) -> set[str]:
    """The service names the server lists through reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def _requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for reply in stub.ServerReflectionInfo(_requests()):
        return {s.name for s in reply.list_services_response.service}
    return set()


def spawn_module(module: str, env: Mapping[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """Runs `python -m module` from the repository root with the generated code importable.

    Its output is piped, or appended to `log` when given.
    """
    with log.open("ab") if log is not None else contextlib.nullcontext(subprocess.PIPE) as out:
        return subprocess.Popen(
            [sys.executable, "-m", module], cwd=REPO_ROOT, env=checkout_env(env), stdout=out, stderr=out
        )


def service_env(service: str, port: int, **settings: object) -> dict[str, str]:
    """The variables of a test's `python -m services.<service>` on `port`, without a metrics port, drain or
    JSON logs, then `settings` (field names: `service_env("gateway", port, INPUT_LAYOUTS=path)`)."""
    values = {"PORT": port, "METRICS_PORT": 0, "DRAIN_SECONDS": 0, "LOG_JSON": "false", **settings}
    return {f"INFERGRID_{service.upper()}_{name}": str(value) for name, value in values.items()}


async def wait_serving(
    port: int, service: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0
) -> None:
    """Waits until health reports SERVING for `service` on loopback `port`.

    Raises:
        AssertionError: The process exited first, or the time ran out.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"server exited early with {proc.returncode}: {err}")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                status = await health_status(channel, service, timeout=0.5)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{service} on port {port} never became SERVING")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Kills `proc` if it is still running and reaps it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=timeout)


async def assert_serves(target: str | Server, service: str) -> None:
    """Asserts the server at `target` (host:port, or a built Server, started here and stopped after) reports
    SERVING for `service` and lists it by reflection."""
    if isinstance(target, Server):
        await target.start()
        try:
            await assert_serves(f"127.0.0.1:{target.port}", service)
        finally:
            await target.stop(0, 0.5)
        return
    async with grpc.aio.insecure_channel(target) as channel:
        for name in ("", service):
            status = await health_status(channel, name)
            assert status == health_pb2.HealthCheckResponse.SERVING, f"health of {name!r} is {status}"
        names = await reflected_services(channel)
    assert service in names, f"{service} not listed by reflection: {sorted(names)}"
    assert "grpc.health.v1.Health" in names


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def http_call(
    url: str, body: bytes | str | None, headers: Mapping[str, str] | None = None, method: str = "POST"
) -> HttpAnswer:
    """One HTTP request with a JSON content type; its answer whatever the status."""
    data = body.encode() if isinstance(body, str) else body
    headers = {"content-type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return HttpAnswer(answer.status, dict(answer.headers.items()), answer.read().decode())
    except urllib.error.HTTPError as err:
        return HttpAnswer(err.code, dict(err.headers.items()), err.read().decode())


def assert_bad_config_exits(module: str, variable: str, value: str) -> None:
    """Asserts `python -m module` with `variable=value` exits non-zero naming the variable."""
    proc = spawn_module(module, {variable: value})
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 2, f"exit status {proc.returncode}, stderr: {err.decode()}"
    assert variable in err.decode(), err.decode()
    assert repr(value) in err.decode(), err.decode()


class FakeLimiter:
    """A `libs.ratelimit.RateLimiter` for unit tests: remembers the buckets asked for, allows while `allow`
    (refusing with a `wait_s` retry hint otherwise) and raises ConnectionError while `fail` is set."""

    def __init__(self, wait_s: float = 1.5) -> None:
        self.calls: list[list[Any]] = []
        self.allow = True
        self.fail = False
        self.wait_s = wait_s

    async def hit(self, buckets: Sequence[Any]) -> Any:
        from libs.ratelimit import BucketState, LimitResult

        if self.fail:
            raise ConnectionError("redis down")
        self.calls.append(list(buckets))
        wait = 0.0 if self.allow else self.wait_s
        return LimitResult(self.allow, tuple(BucketState(0 if wait else 2, wait) for _ in buckets))


# Admission for tests that call a gateway directly (it admits nobody without a verified identity).
TEST_API_KEY = "ig_test-key-for-unit-tests-only"
TEST_ADMISSION_YAML = (
    "admission: {placement: gateway}\n"
    "rate_limit_tiers: {test_big: {requests_per_second: 100000, burst: 100000}}\n"
    "tenants: {test: {tier: test_big, models: ['*']}}\n"
)
# A Redis URL where nothing listens: tests get the local fallback bucket (no Redis needed).
NO_REDIS_URL = "redis://127.0.0.1:9/0"


def write_test_admission(directory: Path, platform_yaml: str = "") -> Path:
    """Writes `platform.yaml` (admission in the gateway, tenant `test` allowed every model, plus
    `platform_yaml`) and its `keys.yaml` holding TEST_API_KEY's hash; returns the platform file."""
    from libs.apikeys import add_key

    directory.mkdir(parents=True, exist_ok=True)
    platform = directory / "platform.yaml"
    platform.write_text(TEST_ADMISSION_YAML + platform_yaml)
    add_key(directory / "keys.yaml", "test", "test", TEST_API_KEY)
    return platform


class WithApiKey(grpc.aio.UnaryUnaryClientInterceptor):
    """A client interceptor that sends TEST_API_KEY on calls that carry no metadata of their own."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if not details.metadata:
            details = details._replace(metadata=grpc.aio.Metadata(("x-api-key", TEST_API_KEY)))
        return await continuation(details, request)
