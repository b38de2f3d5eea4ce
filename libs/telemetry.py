"""One place for logging (JSON with trace ids), OpenTelemetry tracing over OTLP and Prometheus metrics.

Services call `setup_telemetry()` once in `__main__`; nothing else configures
logging, tracers or the metrics endpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import grpc
import prometheus_client
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, SamplingResult, TraceIdRatioBased
from pythonjsonlogger.json import JsonFormatter

from libs.config import env_var

log = logging.getLogger(__name__)

# Set by a multi-worker parent before it spawns workers (prometheus_client's multiprocess mode).
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class TelemetryConfig:
    """Telemetry settings; the OTLP variables are OpenTelemetry's standard names."""

    # "" disables tracing; e.g. http://127.0.0.1:4317 (Jaeger's OTLP gRPC port).
    otlp_endpoint: str = env_var("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    # Fraction of new traces sampled at the root; children follow their parent's decision.
    trace_sample_ratio: float = env_var("OTEL_TRACES_SAMPLER_ARG", 1.0)
    # Port of the Prometheus /metrics endpoint; 0 disables it.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    # JSON logs (production) or plain text (local debugging).
    log_json: bool = True
    # Extra resource attributes, e.g. deployment.environment=dev (comma-separated k=v).
    resource_attributes: tuple[str, ...] = field(default=())


class _TraceContextFilter(logging.Filter):
    """Adds the current trace and span ids to every log record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.service = self._service
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        return True


def setup_logging(service: str, level: str = "INFO", json_logs: bool = True) -> None:
    """Sends all logs to stderr, as JSON objects carrying service, trace_id and span_id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceContextFilter(service))
    if json_logs:
        formatter: logging.Formatter = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(service)s %(trace_id)s %(span_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(trace_id)s] %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AdjustableRatioSampler(Sampler):
    """Samples a ratio of new traces by trace id; the ratio can be changed while the process runs.

    Tracers copy their provider's sampler when they are created, so a run-time change (the inference
    service's TraceSetting) swaps the ratio inside this one sampler instead of replacing it.
    """

    def __init__(self, ratio: float) -> None:
        self._inner = TraceIdRatioBased(ratio)

    @property
    def ratio(self) -> float:
        return float(self._inner.rate)

    def set_ratio(self, ratio: float) -> None:
        """Sets the fraction (0..1) of new root traces sampled from now on."""
        self._inner = TraceIdRatioBased(ratio)

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return self._inner.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return f"AdjustableRatio{{{self.ratio}}}"


def setup_tracing(
    service: str, config: TelemetryConfig, sampler: AdjustableRatioSampler | None = None
) -> TracerProvider | None:
    """Installs a global TracerProvider exporting over OTLP gRPC; None when no endpoint is set."""
    if not config.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    attributes = {"service.name": service, "process.pid": str(os.getpid())}
    for pair in config.resource_attributes:  # key=value
        key, _, value = pair.partition("=")
        attributes[key] = value
    provider = TracerProvider(
        resource=Resource.create(attributes),
        sampler=ParentBased(sampler or AdjustableRatioSampler(config.trace_sample_ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serves Prometheus /metrics; in multi-worker mode, aggregates every worker's metrics.

    Returns:
        The bound port (useful when `port` is 0 in tests).
    """
    registry: prometheus_client.CollectorRegistry = prometheus_client.REGISTRY
    if os.environ.get(PROMETHEUS_MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server, _thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)


@dataclass
class Telemetry:
    """What `setup_telemetry` started; `shutdown()` flushes spans."""

    service: str
    tracer_provider: TracerProvider | None
    metrics_port: int | None
    # The root sampler of `tracer_provider` (None when tracing is off); its ratio can change at run time.
    sampler: AdjustableRatioSampler | None = None

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    def server_tracer(self) -> trace.Tracer | None:
        """The tracer of the server spans (`libs.interceptors`); None when tracing is off."""
        provider = self.tracer_provider
        return None if provider is None else provider.get_tracer("libs.interceptors")

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """OpenTelemetry's gRPC client interceptors: child spans plus traceparent propagation."""
        if not self.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return list(aio_client_interceptors(tracer_provider=self.tracer_provider))

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()


def setup_telemetry(service: str, config: TelemetryConfig, *, serve_metrics: bool = True) -> Telemetry:
    """Configures logging, tracing and (unless a parent process serves it) the metrics endpoint."""
    setup_logging(service, config.log_level, config.log_json)
    sampler = AdjustableRatioSampler(config.trace_sample_ratio)
    provider = setup_tracing(service, config, sampler)
    metrics_port = None
    if serve_metrics and config.metrics_port:
        metrics_port = start_metrics_server(config.metrics_port, config.metrics_host)
    return Telemetry(
        service=service,
        tracer_provider=provider,
        metrics_port=metrics_port,
        sampler=sampler if provider is not None else None,
    )


def tracer(name: str) -> trace.Tracer:
    """Returns a tracer from the global provider (a no-op one when tracing is off)."""
    return trace.get_tracer(name)
