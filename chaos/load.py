"""A steady, bounded open-loop load through Envoy: gRPC and HTTP/JSON mixed, every request with a unique id.

Requests are started at a fixed rate whatever the answers do (an open loop: a fault shows up as errors and
latency, not as a quieter load), at most `max_in_flight` at once, and stop by themselves when `stop()` is
called or the duration runs out. Every request leaves one `Outcome`: when it was sent, how long it took,
which transport carried it, and the status the caller saw. The request id is what the sinks are reconciled
against afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import requests

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from stack.demo import DEMO_REQUEST_FEATURES, demo_request

OK = "OK"
MODEL = "fraud"


@dataclass(frozen=True)
class Outcome:
    """What the caller saw for one request."""

    request_id: str
    transport: str  # "grpc" or "http"
    sent_s: float  # seconds since the load started
    latency_ms: float
    code: str  # "OK", a gRPC status name (e.g. "UNAVAILABLE") or "HTTP <status>"


@dataclass
class LoadSettings:
    """The load's shape.

    Attributes:
        target: Envoy's public listener, host:port.
        api_key: A key of a tenant allowed to call the model.
        rate: Requests started per second (both transports together).
        http_share: Fraction of requests sent as HTTP/JSON (the rest over gRPC).
        timeout_s: Deadline of each request.
        max_in_flight: Requests waiting for an answer at most; beyond it a tick is skipped and counted.
        run_id: Prefix of every request id (unique per run).
    """

    target: str
    api_key: str
    rate: float
    http_share: float = 0.5
    timeout_s: float = 3.0
    max_in_flight: int = 256
    run_id: str = "chaos"


def grpc_request(request_id: str, n: int) -> gateway_pb2.PredictRequest:
    """The demo prediction as a gRPC request with its own id and entity keys."""
    return demo_request(n, model=MODEL, request_id=request_id)


def http_body(request_id: str, n: int) -> bytes:
    """The demo prediction as the JSON body Envoy transcodes."""
    return json.dumps(
        {
            "request_id": request_id,
            "entities": dict(demo_request(n).entities),
            "features": {k: {"double_value": float(v)} for k, v in DEMO_REQUEST_FEATURES.items()},
        }
    ).encode()


@dataclass
class LoadRun:
    """One run of the load; `outcomes` fills in as answers arrive."""

    settings: LoadSettings
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: int = 0  # ticks not sent because max_in_flight requests were outstanding
    started_monotonic: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def now_s(self) -> float:
        """Seconds since the load started (the time axis of the report)."""
        return time.monotonic() - self.started_monotonic

    def stop(self) -> None:
        """Stops starting new requests; those in flight still finish."""
        self._stop.set()

    async def run(self, duration_s: float) -> list[Outcome]:
        """Sends at the set rate until stopped or `duration_s` passed; returns every outcome."""
        s = self.settings
        self.started_monotonic = time.monotonic()
        channel = grpc.aio.insecure_channel(s.target)
        stub = gateway_pb2_grpc.PredictionServiceStub(channel)
        metadata = (("x-api-key", s.api_key),)
        http = _HttpSender(f"http://{s.target}/v1/models/{MODEL}:predict", s.api_key, s.timeout_s)
        in_flight: set[asyncio.Task[None]] = set()
        counter = itertools.count()
        http_every = round(1 / s.http_share) if s.http_share > 0 else 0
        interval = 1.0 / s.rate
        next_tick = time.monotonic()
        deadline = next_tick + duration_s
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                n = next(counter)
                request_id = f"{s.run_id}-{n:07d}"
                if len(in_flight) >= s.max_in_flight:
                    self.skipped += 1
                else:
                    as_http = bool(http_every) and n % http_every == 0
                    coro = (
                        self._http(http, request_id, n)
                        if as_http
                        else self._grpc(stub, metadata, request_id, n)
                    )
                    task = asyncio.create_task(coro)
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                next_tick += interval
                delay = next_tick - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                else:
                    next_tick = time.monotonic()  # fell behind: do not burst to catch up
            if in_flight:
                await asyncio.wait(in_flight, timeout=s.timeout_s + 5)
        finally:
            await channel.close()
            http.close()
        return self.outcomes

    async def _grpc(
        self,
        stub: gateway_pb2_grpc.PredictionServiceStub,
        metadata: Sequence[tuple[str, str]],
        request_id: str,
        n: int,
    ) -> None:
        sent = self.now_s()
        t0 = time.perf_counter()
        try:
            await stub.Predict(
                grpc_request(request_id, n), metadata=metadata, timeout=self.settings.timeout_s
            )
            code = OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        self.outcomes.append(Outcome(request_id, "grpc", sent, (time.perf_counter() - t0) * 1e3, code))

    async def _http(self, http: _HttpSender, request_id: str, n: int) -> None:
        sent = self.now_s()
        t0 = time.perf_counter()
        code = await asyncio.get_running_loop().run_in_executor(
            http.pool, http.post, http_body(request_id, n)
        )
        self.outcomes.append(Outcome(request_id, "http", sent, (time.perf_counter() - t0) * 1e3, code))


class _HttpSender:
    """HTTP/1.1 keep-alive posts from a small thread pool (one `requests.Session` per thread)."""

    def __init__(self, url: str, api_key: str, timeout_s: float, threads: int = 32) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.headers = {"x-api-key": api_key, "content-type": "application/json"}
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="chaos-http")
        self._local = threading.local()

    def post(self, body: bytes) -> str:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            reply = session.post(self.url, data=body, headers=self.headers, timeout=self.timeout_s)
        except requests.Timeout:
            return "HTTP timeout"
        except requests.ConnectionError:
            return "HTTP connection-error"
        return OK if reply.status_code == 200 else f"HTTP {reply.status_code}"

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
