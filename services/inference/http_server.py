"""The Open Inference Protocol's HTTP/JSON API (KServe v2 REST, Triton's extensions) on the data plane.

Served by aiohttp on the service's event loop, from the same process, repository and batchers as the
gRPC API; it only translates JSON (and the binary tensor data extension: a JSON header of
`Inference-Header-Content-Length` bytes followed by the tensors' bytes, wrapped with
`numpy.frombuffer`) to the data plane's requests and back. Errors are the data plane's typed errors
as an HTTP status and `{"error": "..."}`: 400 bad request (naming the field), 404 unknown model or
version, 409 a region registered twice, 429 queue full, 503 not ready, 504 timed out in the queue.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from opentelemetry import propagate, trace

from libs.errors import InvalidArgument, ServiceError
from libs.server import ServerConfig
from libs.telemetry import tracer
from services.inference.codec import InferRequest, InputTensor, RequestedOutput, tensor_bytes
from services.inference.config import HttpConfig
from services.inference.dataplane import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    DataPlane,
    InferResult,
    statistics_json,
)
from services.inference.errors import NotSupported
from services.inference.runtime_settings import trace_changes
from services.inference.shared_memory import SharedMemoryRef

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
_JSON = "application/json"
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNIMPLEMENTED: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# JSON value types each datatype accepts in "data" (bool is an int in Python, so it is listed apart).
_INTS = frozenset({int})
_ACCEPTED: dict[str, frozenset[type]] = {
    "BOOL": frozenset({bool}),
    "FP16": frozenset({int, float}),
    "FP32": frozenset({int, float}),
    "FP64": frozenset({int, float}),
    "BYTES": frozenset({str}),
}
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status a typed error's gRPC code maps to (500 for anything unlisted)."""
    return _STATUS.get(code, 500)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(value), status=status, content_type=_JSON)


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_dumps({"error": message}), status=status, content_type=_JSON, headers=headers)


async def _body(request: web.Request, what: str, *, required: bool = True) -> dict[str, Any]:
    """The JSON object in the body ({} for an empty body when not required)."""
    raw = await request.read()
    if not raw and not required:
        return {}
    return _parse_object(raw, what)


def _parse_object(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what}: the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{what}: expected an integer >= {minimum}, got {value!r}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what}: expected a string, got {value!r}")
    return value


def _params(entry: dict[str, Any], what: str) -> dict[str, Any]:
    params = entry.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{what}: parameters must be a JSON object")
    return params


def _shm_ref(params: dict[str, Any], what: str) -> SharedMemoryRef | None:
    if "shared_memory_region" not in params:
        if "shared_memory_byte_size" in params or "shared_memory_offset" in params:
            raise InvalidArgument(
                f"{what}: shared_memory_byte_size/offset given without shared_memory_region"
            )
        return None
    region = _str(params["shared_memory_region"], f"{what}: parameter shared_memory_region")
    if "shared_memory_byte_size" not in params:
        raise InvalidArgument(
            f"{what}: parameter shared_memory_byte_size is required with shared_memory_region"
        )
    size = _int(params["shared_memory_byte_size"], f"{what}: parameter shared_memory_byte_size")
    offset = _int(params.get("shared_memory_offset", 0), f"{what}: parameter shared_memory_offset")
    return SharedMemoryRef(region, size, offset)


def _flatten(values: list[Any]) -> list[Any]:
    """Row-major values of a (possibly nested) JSON array."""
    if not any(isinstance(v, list) for v in values):
        return values
    out: list[Any] = []
    for v in values:
        if isinstance(v, list):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


def _json_values(data: Any, datatype: str, what: str) -> list[Any]:
    if not isinstance(data, list):
        data = [data]
    values = _flatten(data)
    accepted = _ACCEPTED.get(datatype, _INTS)
    kinds = {type(v) for v in values}
    if not kinds <= accepted:
        wrong = sorted(k.__name__ for k in kinds - accepted)
        raise InvalidArgument(
            f"{what}: 'data' holds {', '.join(wrong)} values, expected {datatype} "
            f"({' or '.join(sorted(k.__name__ for k in accepted))})"
        )
    return values


def parse_infer_request(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[InferRequest, bool]:
    """The transport-free request of an HTTP infer body, and whether outputs default to binary.

    Raises:
        InvalidArgument: Malformed JSON, a bad header length, a field of the wrong type, or binary
            sizes that do not add up to the bytes after the JSON header; names the field.
    """
    view = memoryview(body)
    if header_length is None:
        doc = _parse_object(view, "inference request")
        binary = view[len(body) :]
    else:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if length < 0 or length > len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH}: {header_length!r} is not a length within the {len(body)}-byte body"
            )
        doc = _parse_object(view[:length], "inference request")
        binary = view[length:]
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise InvalidArgument("inputs: expected a non-empty array of input tensors")
    inputs: list[InputTensor] = []
    used = 0
    for i, entry in enumerate(inputs_doc):
        if not isinstance(entry, dict):
            raise InvalidArgument(f"inputs[{i}]: expected a JSON object")
        name = _str(entry.get("name"), f"inputs[{i}].name")
        what = f"input '{name}'"
        datatype = _str(entry.get("datatype"), f"{what}: datatype")
        shape_doc = entry.get("shape")
        if not isinstance(shape_doc, list):
            raise InvalidArgument(f"{what}: shape must be an array of integers")
        shape = tuple(_int(d, f"{what}: shape") for d in shape_doc)
        params = _params(entry, what)
        tensor = InputTensor(name, datatype, shape, shm=_shm_ref(params, what))
        if tensor.shm is None:
            if "binary_data_size" in params:
                size = _int(params["binary_data_size"], f"{what}: parameter binary_data_size")
                if used + size > len(binary):
                    raise InvalidArgument(
                        f"{what}: binary_data_size {size} exceeds the {len(binary) - used} bytes of binary "
                        "data left after the JSON header"
                    )
                tensor.raw = binary[used : used + size]
                used += size
            elif "data" in entry:
                tensor.values = _json_values(entry["data"], datatype, what)
            else:
                raise InvalidArgument(
                    f"{what}: no data; give 'data', parameter binary_data_size or shared_memory_region"
                )
        inputs.append(tensor)
    if used != len(binary):
        raise InvalidArgument(
            f"{len(binary) - used} bytes of binary data after the JSON header belong to no input "
            f"({HEADER_LENGTH} or binary_data_size is wrong)"
        )
    outputs: list[RequestedOutput] = []
    outputs_doc = doc.get("outputs") or []
    if not isinstance(outputs_doc, list):
        raise InvalidArgument("outputs: expected an array of requested outputs")
    for i, entry in enumerate(outputs_doc):
        if not isinstance(entry, dict):
            raise InvalidArgument(f"outputs[{i}]: expected a JSON object")
        name = _str(entry.get("name"), f"outputs[{i}].name")
        what = f"output '{name}'"
        params = _params(entry, what)
        requested = RequestedOutput(name, shm=_shm_ref(params, what))
        if "binary_data" in params:
            if not isinstance(params["binary_data"], bool):
                raise InvalidArgument(f"{what}: parameter binary_data must be a boolean")
            requested.binary = params["binary_data"]
        if "classification" in params:
            requested.classification = _int(params["classification"], f"{what}: parameter classification")
        outputs.append(requested)
    params = _params(doc, "inference request")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidArgument("parameters.binary_data_output: expected a boolean")
    timeout_us = _int(params.get("timeout", 0), "parameters.timeout") if "timeout" in params else 0
    priority = _int(params.get("priority", 0), "parameters.priority")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("id: expected a string")
    return InferRequest(
        model, version, request_id, inputs, outputs, timeout_us, priority=priority
    ), binary_output


def infer_response(result: InferResult, binary_output: bool) -> web.Response:
    """The JSON answer; outputs asked for as binary follow the JSON header (Inference-Header-Content-Length)."""
    outputs = []
    blobs: list[bytes] = []
    for out in result.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape)}
        shm = out.shm
        requested = out.requested
        if shm is not None:
            pass  # written to the region; no "parameters" (Triton's C++ client reads binary_data_size there)
        elif requested.binary if requested is not None and requested.binary is not None else binary_output:
            data = tensor_bytes(out.datatype, out.array)
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        elif out.datatype == "BYTES":
            try:
                entry["data"] = [
                    v.decode() if isinstance(v, bytes) else str(v) for v in out.array.reshape(-1)
                ]
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"output '{out.name}': BYTES output is not UTF-8 text; request it with binary_data: true"
                ) from None
        else:
            entry["data"] = out.array.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": outputs}
    if result.id:
        doc["id"] = result.id
    header = _dumps(doc)
    if not blobs:
        return web.Response(body=header, content_type=_JSON)
    return web.Response(
        body=b"".join((header, *blobs)),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def _trace_json(values: dict[str, list[str]]) -> dict[str, Any]:
    """Triton's JSON form: trace_level a list, every other setting one string."""
    return {k: (v if k == "trace_level" else (v[0] if v else "")) for k, v in values.items()}


class HttpFrontDoor:
    """The HTTP/JSON server: routes to the data plane, started and stopped with the gRPC server."""

    def __init__(
        self, dataplane: DataPlane, http: HttpConfig, server: ServerConfig, *, tracing: bool
    ) -> None:
        """Binds to `http.http_host` (else the gRPC server's host) and `http.http_port`; bodies up to the
        server's max_message_bytes; the port is shared (SO_REUSEPORT) when the server runs several workers."""
        self._plane = dataplane
        self._host = http.http_host or server.host
        self._port = http.http_port
        self._reuse_port = server.workers > 1
        self._tracing = tracing
        self._grace = server.grace_seconds
        self.app = web.Application(client_max_size=server.max_message_bytes, middlewares=[self._errors])
        self._routes(self.app.router)
        self._runner: web.AppRunner | None = None

    def _routes(self, r: web.UrlDispatcher) -> None:
        get, post = r.add_get, r.add_post
        get("/v2", self.server_metadata, allow_head=False)
        get("/v2/health/live", self.live, allow_head=False)
        get("/v2/health/ready", self.ready, allow_head=False)
        get("/v2/models/stats", self.statistics, allow_head=False)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            get(base, self.model_metadata, allow_head=False)
            get(base + "/ready", self.model_ready, allow_head=False)
            get(base + "/config", self.model_config, allow_head=False)
            get(base + "/stats", self.statistics, allow_head=False)
            post(base + "/infer", self.infer)
        post("/v2/repository/index", self.repository_index)
        post("/v2/repository/models/{model}/load", self.load)
        post("/v2/repository/models/{model}/unload", self.unload)
        get("/v2/systemsharedmemory/status", self.shm_status, allow_head=False)
        get("/v2/systemsharedmemory/region/{region}/status", self.shm_status, allow_head=False)
        post("/v2/systemsharedmemory/region/{region}/register", self.shm_register)
        post("/v2/systemsharedmemory/unregister", self.shm_unregister)
        post("/v2/systemsharedmemory/region/{region}/unregister", self.shm_unregister)
        get("/v2/cudasharedmemory/status", self.cuda_shm_status, allow_head=False)
        get("/v2/cudasharedmemory/region/{region}/status", self.cuda_shm_status, allow_head=False)
        post("/v2/cudasharedmemory/region/{region}/register", self.cuda_shm_register)
        post("/v2/cudasharedmemory/unregister", self.cuda_shm_unregister)
        post("/v2/cudasharedmemory/region/{region}/unregister", self.cuda_shm_unregister)
        for path in ("/v2/trace/setting", "/v2/models/{model}/trace/setting"):
            get(path, self.trace_setting, allow_head=False)
            post(path, self.trace_setting)
        get("/v2/logging", self.log_settings, allow_head=False)
        post("/v2/logging", self.log_settings)

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Typed errors to their HTTP status and {"error": ...}; anything unexpected to 500, logged once."""
        try:
            return await handler(request)
        except ServiceError as exc:
            headers = {k: v for k, v in exc.trailing_metadata} if exc.trailing_metadata else None
            return _error(exc.message, http_status(exc.code), headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(f"{exc.reason}: {request.method} {request.path}", exc.status)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _error("internal error", 500)

    # --- lifecycle ---

    async def start(self) -> None:
        """Binds and serves (an occupied port fails start-up)."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._grace)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, reuse_port=self._reuse_port or None, backlog=1024)
        await site.start()
        self._runner = runner
        log.info("inference HTTP/JSON API on %s:%d", self._host, self._port, extra={"http_port": self._port})

    async def stop(self) -> None:
        """Stops accepting, lets in-flight requests finish (within the grace period), closes."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- health and metadata ---

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if self._plane.ready():
            return web.Response(status=200)
        return _error("server is not ready", 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version", "")
        if self._plane.repository.is_ready(name, version):
            return web.Response(status=200)
        label = f"model '{name}'" + (f" version '{version}'" if version else "")
        return _error(f"{label} is not ready", 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(self._plane.metadata(request.match_info["model"], request.match_info.get("version", "")))

    async def model_config(self, request: web.Request) -> web.Response:
        serving = self._plane.model(request.match_info["model"], request.match_info.get("version", ""))
        return _json(
            json_format.MessageToDict(
                serving.spec.config,
                always_print_fields_with_no_presence=True,
                preserving_proto_field_name=True,
                unquote_int64_if_possible=True,
            )
        )

    async def statistics(self, request: web.Request) -> web.Response:
        chosen = self._plane.statistics(
            request.match_info.get("model", ""), request.match_info.get("version", "")
        )
        return _json({"model_stats": [statistics_json(s) for s in chosen]})

    # --- inference ---

    async def infer(self, request: web.Request) -> web.Response:
        info = request.match_info
        self._plane.model(info["model"], info.get("version", ""))  # 404 before looking at the body
        body = await request.read()
        infer_request, binary_output = parse_infer_request(
            body, request.headers.get(HEADER_LENGTH), info["model"], info.get("version", "")
        )
        if not self._tracing:
            return infer_response(await self._plane.infer(infer_request), binary_output)
        with _tracer.start_as_current_span(
            f"POST {request.path}", context=propagate.extract(request.headers), kind=trace.SpanKind.SERVER
        ):
            result = await self._plane.infer(infer_request)
        return infer_response(result, binary_output)

    # --- repository ---

    async def repository_index(self, request: web.Request) -> web.Response:
        doc = await _body(request, "repository index request", required=False)
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("ready: expected a boolean")
        return _json(
            [
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in self._plane.repository.index(ready_only=ready)
            ]
        )

    async def load(self, request: web.Request) -> web.Response:
        doc = await _body(request, "model load request", required=False)
        params: dict[str, Any] = dict(_params(doc, "model load request"))
        for key, value in params.items():
            if key.startswith("file:"):  # Triton's HTTP client sends the file base64-encoded
                try:
                    params[key] = base64.b64decode(_str(value, f"parameters.{key}"), validate=True)
                except binascii.Error:
                    raise InvalidArgument(
                        f"parameters.{key}: expected the file's content in base64"
                    ) from None
        await self._plane.load(request.match_info["model"], params, dict(request.headers.items()))
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        doc = await _body(request, "model unload request", required=False)
        _params(doc, "model unload request")  # unload_dependents: no model has dependents here
        await self._plane.unload(request.match_info["model"], dict(request.headers.items()))
        return web.Response(status=200)

    # --- shared memory ---

    async def shm_status(self, request: web.Request) -> web.Response:
        regions = self._plane.shared_memory.status(request.match_info.get("region", ""))
        return _json(
            [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in regions]
        )

    async def shm_register(self, request: web.Request) -> web.Response:
        doc = await _body(request, "shared memory register request")
        self._plane.shared_memory.register(
            request.match_info["region"],
            _str(doc.get("key"), "key"),
            _int(doc.get("offset", 0), "offset"),
            _int(doc.get("byte_size"), "byte_size", minimum=1),
        )
        return web.Response(status=200)

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self._plane.shared_memory.unregister(request.match_info.get("region", ""))
        return web.Response(status=200)

    async def cuda_shm_status(self, request: web.Request) -> web.Response:
        self._plane.cuda_shared_memory_status(request.match_info.get("region", ""))
        return _json([])

    async def cuda_shm_register(self, request: web.Request) -> web.Response:
        self._plane.register_cuda_shared_memory()
        return web.Response(status=200)  # not reached: registering always raises

    async def cuda_shm_unregister(self, request: web.Request) -> web.Response:
        self._plane.unregister_cuda_shared_memory(request.match_info.get("region", ""))
        return web.Response(status=200)

    # --- trace and log settings ---

    async def trace_setting(self, request: web.Request) -> web.Response:
        model = request.match_info.get("model", "")
        if model:
            self._plane.model(model)  # 404 for an unknown model
        if request.method == "POST":
            changes = trace_changes(await _body(request, "trace settings"), "trace setting")
            if changes:
                if model:
                    raise NotSupported(
                        "trace settings are server-wide here; update them on /v2/trace/setting"
                    )
                return _json(_trace_json(self._plane.trace.update(changes)))
        return _json(_trace_json(self._plane.trace.current()))

    async def log_settings(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            changes = await _body(request, "log settings")
            return _json(self._plane.log.update(changes))
        return _json(self._plane.log.current())
