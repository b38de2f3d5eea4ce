"""Property-based fuzzing (Hypothesis, derandomized) of the gRPC bodies of Predict, PredictBatch, ModelInfer
and WriteFeatures.

Real servers on port 0 (the gateway with in-memory feature and inference fakes, the inference server with
the test model repository, the features server on in-memory stores with a view of every value type), run
in a thread of their own; every generated body, well-formed message or
mutated bytes, must be answered OK or with a client-error status whose message says what is wrong: never
INTERNAL or UNKNOWN, never a class name, and the server answers a valid call afterwards.

`make test` runs 1,250 inputs per property, 10,000 in all (eight properties);
`INFERGRID_FUZZ_EXAMPLES=10000` raises the examples per property (80,000 inputs) for the long run. The figures print at the end of the run.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference import grpc_service_pb2 as ipb
from inference import grpc_service_pb2_grpc
from infergrid.features.v1 import features_pb2, features_pb2_grpc
from infergrid.gateway.v1 import gateway_pb2
from libs.server import ServerConfig
from libs.testing import NO_REDIS_URL, TEST_API_KEY, write_test_admission
from services.features.config import FeaturesConfig, FeaturesServerConfig
from services.features.server import create_server as create_features
from services.features.tests.fakes import InMemoryCache, InMemoryOnlineStore, InMemoryViewStore
from services.features.tests.views import typed_row, typed_view
from services.gateway.config import (
    AdmissionConfig,
    GatewayConfig,
    GatewayServerConfig,
    ModelsConfig,
    UpstreamConfig,
)
from services.gateway.server import create_server as create_gateway
from services.gateway.tests.fake_servers import FakeFeatureService, FakeInference
from services.gateway.tests.fakes import write_layout
from services.inference.config import (
    ControlConfig,
    HttpConfig,
    InferenceConfig,
    ModelServingConfig,
)
from services.inference.server import create_server as create_inference
from services.inference.tests.models import write_repository

EXAMPLES = int(os.environ.get("INFERGRID_FUZZ_EXAMPLES", "1250"))
FUZZ = settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# A client error names the problem; these never may.
SERVER_ERRORS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
FIGURES: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
CRASHES: list[str] = []
METADATA = (("x-api-key", TEST_API_KEY),)


class _Servers:
    """An event loop in a thread of its own, hosting the servers under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    host = _Servers()
    started: list[Any] = []

    async def start() -> dict[str, int]:
        grpc_servers = []
        features, inference = FakeFeatureService(), FakeInference()
        ports = {}
        for name, add, servicer in (
            ("features", features_pb2_grpc.add_FeatureServiceServicer_to_server, features),
            ("fake_inference", grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, inference),
        ):
            server = grpc.aio.server()
            add(servicer, server)
            ports[name] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            grpc_servers.append(server)
        gateway = await create_gateway(
            GatewayConfig(
                server=GatewayServerConfig(port=0),
                models=ModelsConfig(
                    input_layouts=write_layout(tmp / "layouts"), platform_file=write_test_admission(tmp / "p")
                ),
                admission=AdmissionConfig(admission_redis_url=NO_REDIS_URL),
                upstream=UpstreamConfig(
                    features_target=f"127.0.0.1:{ports['features']}",
                    inference_target=f"127.0.0.1:{ports['fake_inference']}",
                    features_timeout_s=0.5,
                ),
                inference_log_enabled=False,
            )
        )
        await gateway.start()
        real_inference = await create_inference(
            InferenceConfig(
                server=ServerConfig(port=0, drain_seconds=0, grace_seconds=0.5),
                models=ModelServingConfig(model_repository=write_repository(tmp / "models")),
                http=HttpConfig(http_port=0),
                control=ControlConfig(control_enabled=False),
            )
        )
        await real_inference.start()
        real_features = await create_features(
            FeaturesConfig(server=FeaturesServerConfig(port=0, drain_seconds=0, grace_seconds=0.5)),
            store=InMemoryOnlineStore(),
            view_store=InMemoryViewStore(),
            cache=InMemoryCache(),
        )
        await real_features.start()
        started.extend(
            [
                ("ours", gateway),
                ("ours", real_inference),
                ("ours", real_features),
                *(("grpc", s) for s in grpc_servers),
            ]
        )
        return {"gateway": gateway.port, "inference": real_inference.port, "features": real_features.port}

    async def stop() -> None:
        for kind, server in started:
            await (server.stop(0, 0.5) if kind == "ours" else server.stop(0))

    ports = host.run(start())
    try:
        yield ports
    finally:
        host.run(stop())
        host.close()
        _print_figures()


def _print_figures() -> None:
    total = sum(sum(c.values()) for c in FIGURES.values())
    print(f"\nfuzz figures: {total} inputs tried, {len(CRASHES)} server errors")
    for target, codes in sorted(FIGURES.items()):
        print(
            f"  {target}: {sum(codes.values())} inputs; "
            + ", ".join(f"{k} {v}" for k, v in codes.most_common())
        )
    for crash in CRASHES[:10]:
        print(f"  server error: {crash}")


@pytest.fixture(scope="module")
def gateway_channel(servers: dict[str, int]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{servers['gateway']}") as channel:
        yield channel


@pytest.fixture(scope="module")
def inference_channel(servers: dict[str, int]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{servers['inference']}") as channel:
        yield channel


@pytest.fixture(scope="module")
def features_channel(servers: dict[str, int]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{servers['features']}") as channel:
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        stub.ApplyFeatureView(features_pb2.ApplyFeatureViewRequest(feature_view=typed_view()), timeout=10)
        yield channel


def _raw(channel: grpc.Channel, method: str) -> Callable[..., bytes]:
    return channel.unary_unary(method)  # bytes in, bytes out


def _check(target: str, call: Callable[[], object]) -> None:
    """Makes the call; records its status; fails on a server error or a message that names nothing."""
    try:
        call()
        FIGURES[target]["OK"] += 1
        return
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    FIGURES[target][code.name] += 1
    if code in SERVER_ERRORS:
        CRASHES.append(f"{target}: {code.name} {details[:200]}")
    assert code not in SERVER_ERRORS, f"{target}: {code.name}: {details}"
    assert details.strip(), f"{target}: {code.name} with no message"
    assert "<class" not in details and "Traceback" not in details, details


# Well-formed messages with hostile contents: odd text, odd numbers, unknown models, many rows.
_text = st.one_of(
    st.sampled_from(["", "toy", "fraud", "user_id", "merchant_id", "u1", "m1", "amount", "hour", "1", "2"]),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40),
    # Any code point a proto string can hold (surrogates cannot be UTF-8); long ones too.
    st.text(alphabet=st.characters(max_codepoint=0x10FFFF, exclude_categories=["Cs"]), max_size=300),
)
_value = st.one_of(
    st.builds(lambda f: {"float_value": f}, st.floats(allow_nan=True, allow_infinity=True, width=32)),
    st.builds(lambda f: {"double_value": f}, st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda i: {"int64_value": i}, st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda s: {"string_value": s}, _text),
    st.builds(lambda b: {"bool_value": b}, st.booleans()),
    st.just({}),
)


_entities = st.dictionaries(_text, _text, max_size=4)
_features = st.dictionaries(_text, _value, max_size=4)


@st.composite
def predict_requests(draw: st.DrawFn) -> gateway_pb2.PredictRequest:
    request = gateway_pb2.PredictRequest(
        model=draw(st.one_of(st.just("toy"), _text)),
        version=draw(st.one_of(st.just(""), _text)),
        request_id=draw(st.one_of(st.just(""), _text)),
        entities=draw(_entities),
    )
    for name, value in draw(_features).items():
        request.features[name].MergeFrom(type(request.features[name])(**value))
    return request


@st.composite
def batch_requests(draw: st.DrawFn) -> gateway_pb2.PredictBatchRequest:
    request = gateway_pb2.PredictBatchRequest(
        model=draw(st.one_of(st.just("toy"), _text)), version=draw(st.one_of(st.just(""), _text))
    )
    for _ in range(draw(st.integers(0, 6))):
        row = request.rows.add(request_id=draw(st.one_of(st.just(""), _text)), entities=draw(_entities))
        for name, value in draw(_features).items():
            row.features[name].MergeFrom(type(row.features[name])(**value))
    return request


def _mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid body with bytes flipped, cut, inserted or spliced: what a broken client or proxy sends."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
            at = draw(st.integers(0, max(0, len(data) - 1)))
            if op == "flip" and data:
                data[at] = draw(st.integers(0, 255))
            elif op == "cut":
                data = data[:at]
            elif op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            else:
                data[at:] = draw(st.binary(max_size=16))
        return bytes(data)

    return st.one_of(mutate(), st.binary(max_size=64))


_VALID_PREDICT = gateway_pb2.PredictRequest(model="toy", entities={"user_id": "u1", "merchant_id": "m1"})
_VALID_PREDICT.features["amount"].float_value = 5.0
_VALID_BATCH = gateway_pb2.PredictBatchRequest(model="toy")
_VALID_BATCH.rows.add(entities={"user_id": "u1", "merchant_id": "m1"}).features["amount"].float_value = 1.0
_PREDICT = "/infergrid.gateway.v1.PredictionService/Predict"
_BATCH = "/infergrid.gateway.v1.PredictionService/PredictBatch"
_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _fraud_infer() -> ipb.ModelInferRequest:
    import numpy as np

    x = np.ones((2, 32), dtype=np.float32)
    return ipb.ModelInferRequest(
        model_name="fraud",
        id="req-1",
        inputs=[ipb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=[2, 32])],
        raw_input_contents=[x.tobytes()],
    )


_VALID_INFER = _fraud_infer()


def _valid_call_still_ok(channel: grpc.Channel, method: str, body: bytes) -> None:
    _raw(channel, method)(body, metadata=METADATA, timeout=10)


@FUZZ
@given(request=predict_requests())
def test_predict_messages(gateway_channel: grpc.Channel, request: gateway_pb2.PredictRequest) -> None:
    body = request.SerializeToString()
    _check("Predict (messages)", lambda: _raw(gateway_channel, _PREDICT)(body, metadata=METADATA, timeout=10))


@FUZZ
@given(request=batch_requests())
def test_predict_batch_messages(
    gateway_channel: grpc.Channel, request: gateway_pb2.PredictBatchRequest
) -> None:
    body = request.SerializeToString()
    _check(
        "PredictBatch (messages)", lambda: _raw(gateway_channel, _BATCH)(body, metadata=METADATA, timeout=10)
    )


@FUZZ
@given(body=_mutated(_VALID_PREDICT.SerializeToString()))
def test_predict_mutated_bytes(gateway_channel: grpc.Channel, body: bytes) -> None:
    _check("Predict (bytes)", lambda: _raw(gateway_channel, _PREDICT)(body, metadata=METADATA, timeout=10))


@FUZZ
@given(body=_mutated(_VALID_BATCH.SerializeToString()))
def test_predict_batch_mutated_bytes(gateway_channel: grpc.Channel, body: bytes) -> None:
    _check("PredictBatch (bytes)", lambda: _raw(gateway_channel, _BATCH)(body, metadata=METADATA, timeout=10))


_datatypes = st.sampled_from(["FP32", "FP64", "INT64", "INT32", "BOOL", "BYTES", "UINT8", "FP16", "", "XX"])


@st.composite
def infer_requests(draw: st.DrawFn) -> ipb.ModelInferRequest:
    request = ipb.ModelInferRequest(
        model_name=draw(st.one_of(st.just("fraud"), _text)),
        model_version=draw(st.one_of(st.just(""), _text)),
        id=draw(_text),
    )
    for _ in range(draw(st.integers(0, 3))):
        request.inputs.add(
            name=draw(st.one_of(st.just("features"), _text)),
            datatype=draw(_datatypes),
            shape=draw(st.lists(st.integers(-3, 2**40), max_size=4)),
        )
    for _ in range(draw(st.integers(0, 3))):
        request.raw_input_contents.append(draw(st.binary(max_size=256)))
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(_text))
    return request


@FUZZ
@given(request=infer_requests())
def test_model_infer_messages(inference_channel: grpc.Channel, request: ipb.ModelInferRequest) -> None:
    body = request.SerializeToString()
    _check("ModelInfer (messages)", lambda: _raw(inference_channel, _INFER)(body, timeout=10))


@FUZZ
@given(body=_mutated(_VALID_INFER.SerializeToString()))
def test_model_infer_mutated_bytes(inference_channel: grpc.Channel, body: bytes) -> None:
    _check("ModelInfer (bytes)", lambda: _raw(inference_channel, _INFER)(body, timeout=10))


_WRITE = "/infergrid.features.v1.FeatureService/WriteFeatures"
_VALID_WRITE = features_pb2.WriteFeaturesRequest(
    feature_view="typed", rows=[typed_row("a", ts_s=1_700_000_000.5)]
)
_list_value = st.one_of(
    st.builds(lambda v: {"float_list_value": {"values": v}}, st.lists(st.floats(width=32), max_size=4)),
    st.builds(
        lambda v: {"int64_list_value": {"values": v}}, st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)
    ),
    st.builds(lambda v: {"string_list_value": {"values": v}}, st.lists(_text, max_size=4)),
    st.builds(lambda b: {"bytes_value": b}, st.binary(max_size=64)),
)


@st.composite
def write_requests(draw: st.DrawFn) -> features_pb2.WriteFeaturesRequest:
    """Rows for the typed view (or a made-up one): valid rows, valid rows with one part replaced, and rows
    with keys, values and event times of any kind."""
    view = draw(st.sampled_from(["typed", "typed", "typed", "nope"]) | _text)
    request = features_pb2.WriteFeaturesRequest(feature_view=view)
    names = st.one_of(
        st.sampled_from(["f_float", "f_double", "f_int64", "f_string", "f_bytes", "f_bool", "f_floats"]),
        _text,
    )
    hostile = st.one_of(_value, _list_value)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["valid", "edited", "hostile"]))
        row = request.rows.add()
        if kind != "hostile":
            row.CopyFrom(typed_row(draw(_text), ts_s=draw(st.floats(1e9, 2e9))))
        if kind == "valid":
            continue
        part = draw(st.sampled_from(["key", "value", "time"])) if kind == "edited" else "all"
        if part in ("key", "all"):
            for key, value in draw(
                st.dictionaries(st.just("id") | _text, hostile, min_size=1, max_size=2)
            ).items():
                row.entity_key[key].MergeFrom(type(row.entity_key[key])(**value))
        if part in ("value", "all"):
            for name, value in draw(st.dictionaries(names, hostile, min_size=1, max_size=3)).items():
                row.values[name].MergeFrom(type(row.values[name])(**value))
        if part in ("time", "all"):
            row.event_timestamp.seconds = draw(st.integers(-(2**63), 2**63 - 1))
            row.event_timestamp.nanos = draw(st.integers(-(2**31), 2**31 - 1))
    return request


@FUZZ
@given(request=write_requests())
def test_write_features_messages(
    features_channel: grpc.Channel, request: features_pb2.WriteFeaturesRequest
) -> None:
    body = request.SerializeToString()
    _check("WriteFeatures (messages)", lambda: _raw(features_channel, _WRITE)(body, timeout=10))


@FUZZ
@given(body=_mutated(_VALID_WRITE.SerializeToString()))
def test_write_features_mutated_bytes(features_channel: grpc.Channel, body: bytes) -> None:
    _check("WriteFeatures (bytes)", lambda: _raw(features_channel, _WRITE)(body, timeout=10))


def test_servers_still_answer_valid_calls(
    gateway_channel: grpc.Channel, inference_channel: grpc.Channel, features_channel: grpc.Channel
) -> None:
    """After the fuzzing above (module order), a valid call to each method is OK."""
    _valid_call_still_ok(gateway_channel, _PREDICT, _VALID_PREDICT.SerializeToString())
    _valid_call_still_ok(gateway_channel, _BATCH, _VALID_BATCH.SerializeToString())
    reply = ipb.ModelInferResponse.FromString(
        _raw(inference_channel, _INFER)(_VALID_INFER.SerializeToString())
    )
    assert reply.model_name == "fraud"
    written = features_pb2.WriteFeaturesResponse.FromString(
        _raw(features_channel, _WRITE)(_VALID_WRITE.SerializeToString(), timeout=10)
    )
    assert written.rows_written == 1
    assert not CRASHES, CRASHES
