"""The prediction pipeline with in-memory fakes: validation, versions, degraded rows, batching, shedding, logging."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from typing import TypeVar

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from infergrid.gateway.v1 import gateway_pb2
from infergrid.logging.v1 import logging_pb2
from libs.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from libs.platform import parse_platform
from services.gateway.catalog import ModelCatalog, parse_spec
from services.gateway.config import BatchingConfig, UpstreamConfig
from services.gateway.predictor import CallInfo, Predictor
from services.gateway.records import event_times_wire, record_template
from services.gateway.routing import TrafficRouter
from services.gateway.tests.fakes import FakeFeatures, FakeModels, ListPublisher, expected_score, toy_spec

STORE = {
    ("user", "u1"): {"age": 40.0, "count": 3.0},
    ("user", "u2"): {"age": 50.0, "count": 4.0},
    ("merchant", "m1"): {"risk": 0.25},
}
SPLIT = """
models:
  toy:
    versions: [{version: "1", weight: 90}, {version: "2", weight: 10}]
    shadow: "2"
"""
ONLY_V1_WITH_SHADOW = SPLIT.replace(', {version: "2", weight: 10}', "")


def request(
    user: str = "u1",
    merchant: str = "m1",
    amount: float | None = 5.0,
    hour: float | None = 3.0,
    **extra: object,
) -> gateway_pb2.PredictRequest:
    req = gateway_pb2.PredictRequest(model="toy", entities={"user_id": user, "merchant_id": merchant})
    if amount is not None:
        req.features["amount"].float_value = amount
    if hour is not None:
        req.features["hour"].int64_value = int(hour)
    for name, value in extra.items():
        if isinstance(value, str):
            req.features[name].string_value = value
        else:
            req.features[name].double_value = float(value)  # type: ignore[arg-type]
    return req


T = TypeVar("T")


def _section(section: type[T], knobs: dict[str, object]) -> T:
    """The config section with the knobs among `knobs` that are its fields; its defaults otherwise."""
    names = {field.name for field in dataclasses.fields(section)}  # type: ignore[arg-type]
    return section(**{name: value for name, value in knobs.items() if name in names})


class Setup:
    def __init__(self, router: TrafficRouter | None = None, **settings: object) -> None:
        known = {f.name for section in (UpstreamConfig, BatchingConfig) for f in dataclasses.fields(section)}
        assert set(settings) <= known, f"not a gateway setting: {sorted(set(settings) - known)}"
        self.features = FakeFeatures(STORE)
        self.models = FakeModels()
        self.publisher = ListPublisher()
        self.predictor = Predictor(
            ModelCatalog({"toy": toy_spec()}),
            router or TrafficRouter(),
            self.features,
            self.models,
            self.publisher,
            upstream=_section(UpstreamConfig, settings),
            batching=_section(BatchingConfig, settings),
        )

    async def one(self, req: gateway_pb2.PredictRequest, call: CallInfo | None = None) -> object:
        (prediction,) = await self.predictor.predict(req.model, req.version, [req], call or CallInfo())
        return prediction


async def test_a_row_is_assembled_in_model_order_scored_and_logged() -> None:
    s = Setup()
    req = request()
    req.request_id = "r-1"
    p = await s.one(req, CallInfo(tenant="acme"))
    # amount, user:age, hour, user:count, merchant:risk; no split: the highest version
    assert p.version == "2"  # type: ignore[attr-defined]
    assert p.outputs["score"][0] == pytest.approx(expected_score([5, 40, 3, 3, 0.25], "2"))  # type: ignore[attr-defined]
    assert p.degraded_features == []  # type: ignore[attr-defined]
    (record,) = s.publisher.records
    assert record.request_id == "r-1" and record.tenant == "acme" and record.model_version == "2"
    assert dict(record.entities) == {"user_id": "u1", "merchant_id": "m1"}
    assert record.features["user:age"].float_value == 40.0
    assert record.request_inputs["hour"].int64_value == 3
    assert record.outputs["score"].float_value == pytest.approx(expected_score([5, 40, 3, 3, 0.25], "2"))
    assert record.status_code == 0 and not record.degraded and record.latency_us >= 0
    assert record.request_time.ToNanoseconds() <= record.response_time.ToNanoseconds()


async def test_the_record_carries_the_event_time_of_each_store_value_used() -> None:
    s = Setup()
    s.features.event_us = {("user", "u1"): 1_700_000_000_123_456, ("merchant", "m1"): 1_600_000_000_000_000}
    await s.one(request())
    await s.one(request(user="u-unknown"))  # user:* missing: defaults, no event time
    known, unknown = s.publisher.records
    times = {name: t.ToMicroseconds() for name, t in known.feature_event_times.items()}
    assert times == {
        "user:age": 1_700_000_000_123_456,
        "user:count": 1_700_000_000_123_456,
        "merchant:risk": 1_600_000_000_000_000,
    }
    assert {name: t.ToMicroseconds() for name, t in unknown.feature_event_times.items()} == {
        "merchant:risk": 1_600_000_000_000_000
    }
    # A batch carries each row's own times.
    preds = await s.predictor.predict(
        "toy", "", [request(user="u2"), request(user="u1")], CallInfo(), batch=True
    )
    assert len(preds) == 2
    assert [r.feature_event_times["merchant:risk"].ToMicroseconds() for r in s.publisher.records[2:]] == [
        1_600_000_000_000_000
    ] * 2
    assert "user:age" not in s.publisher.records[2].feature_event_times  # u2 has no event time: unknown


def test_event_times_wire_parses_to_the_map_it_stands_for() -> None:
    spec = toy_spec()
    for times in ([1, 0, 0], [0, 0, 0], [-1_500_000, 2_000_000, 1_700_000_000_999_999]):
        record = logging_pb2.InferenceLogRecord.FromString(event_times_wire(spec, times))
        expected = {ref: us for ref, us in zip(spec.store_refs, times, strict=True) if us}
        assert {k: v.ToMicroseconds() for k, v in record.feature_event_times.items()} == expected
    # A name long enough for a two-byte entry length.
    long_name = "user:" + "x" * 200
    spec = parse_spec(
        "long", {"entities": {"user": "user_id"}, "features": [{"name": long_name, "source": "user"}]}
    )
    record = logging_pb2.InferenceLogRecord.FromString(event_times_wire(spec, [1_700_000_000_000_001]))
    assert record.feature_event_times[long_name].ToMicroseconds() == 1_700_000_000_000_001


@pytest.mark.parametrize("event_us", [1, -1_500_000, 1_700_000_000_999_999])
def test_record_parts_are_what_the_generated_class_serializes(event_us: int) -> None:
    name = "user:" + "x" * 200
    golden = logging_pb2.InferenceLogRecord()
    golden.feature_event_times[name].FromMicroseconds(event_us)
    template = record_template([name], [0])
    spec = parse_spec(
        "long", {"entities": {"user": "user_id"}, "features": [{"name": name, "source": "user"}]}
    )
    assert event_times_wire(spec, [event_us]) == golden.SerializeToString()
    golden = logging_pb2.InferenceLogRecord()
    golden.features[name].float_value = 0.0
    assert template.features_wire.tobytes() == golden.SerializeToString()


@pytest.mark.parametrize(
    ("mutate", "error", "field"),
    [
        (lambda r: setattr(r, "model", ""), InvalidArgument, "model:"),
        (lambda r: setattr(r, "model", "nope"), NotFound, "'nope'"),
        (lambda r: setattr(r, "version", "7"), NotFound, "version '7'"),
        (lambda r: r.features["amount"].__setattr__("string_value", "ten"),
         InvalidArgument, "features.amount: expected a number"),
        (lambda r: r.features["nope"].__setattr__("float_value", 1.0), InvalidArgument, "features.nope"),
        (lambda r: r.features["amount"].__setattr__("double_value", float("nan")), InvalidArgument,
         "features.amount: must be finite"),
        (lambda r: r.entities.pop("user_id"), InvalidArgument, "entities.user_id: is required"),
        (lambda r: r.entities.__setitem__("shop", "x"), InvalidArgument, "entities.shop: not an entity key"),
    ],
)  # fmt: skip
async def test_bad_input_is_refused_naming_the_field(mutate: object, error: type, field: str) -> None:
    s = Setup()
    req = request()
    mutate(req)  # type: ignore[operator]
    with pytest.raises(error, match=field.replace("(", r"\(")):
        await s.one(req)
    assert s.models.calls == [] and s.publisher.records == []


async def test_batch_errors_name_the_row() -> None:
    s = Setup()
    rows = [gateway_pb2.PredictRow(entities={"user_id": "u1", "merchant_id": "m1"}) for _ in range(3)]
    rows[2].features["hour"].string_value = "noon"
    with pytest.raises(InvalidArgument, match=r"rows\[2\]\.features\.hour"):
        await s.predictor.predict("toy", "", rows, CallInfo(), batch=True)
    with pytest.raises(InvalidArgument, match="rows: at least one"):
        await s.predictor.predict("toy", "", [], CallInfo(), batch=True)


async def test_the_edge_authorized_model_must_match() -> None:
    s = Setup()
    with pytest.raises(PermissionDenied, match="'toy'"):
        await s.one(request(), CallInfo(allowed_models=frozenset({"other"})))
    await s.one(request(), CallInfo(allowed_models=frozenset({"toy"})))


async def test_missing_values_use_defaults_and_mark_the_row_degraded() -> None:
    s = Setup()
    p = await s.one(request(user="u-unknown", hour=None))
    # user:* missing -> 30, 2; hour missing -> 12
    assert p.outputs["score"][0] == pytest.approx(expected_score([5, 30, 12, 2, 0.25], "2"))  # type: ignore[attr-defined]
    assert sorted(p.degraded_features) == ["hour", "user:age", "user:count"]  # type: ignore[attr-defined]
    assert s.publisher.records[0].degraded


async def test_features_down_serves_defaults_fast_and_degraded() -> None:
    s = Setup()
    s.features.failure = Unavailable("features is unavailable")
    p = await s.one(request())
    assert p.outputs["score"][0] == pytest.approx(expected_score([5, 30, 3, 2, 0.5], "2"))  # type: ignore[attr-defined]
    assert sorted(p.degraded_features) == ["merchant:risk", "user:age", "user:count"]  # type: ignore[attr-defined]


async def test_slow_features_are_cut_at_their_budget_and_degrade() -> None:
    s = Setup(features_timeout_s=0.02)
    s.features.delay_s = 0.5
    p = await s.one(request())
    assert len(p.degraded_features) == 3  # type: ignore[attr-defined]


async def test_inference_failure_fails_the_row_and_is_logged() -> None:
    s = Setup()
    s.models.failure = Unavailable("the inference service is unavailable")
    with pytest.raises(Unavailable):
        await s.one(request())
    (record,) = s.publisher.records
    assert record.status_code == 14 and "unavailable" in record.error_message


async def test_concurrent_requests_are_coalesced_and_split_back_in_order() -> None:
    s = Setup(max_batch_delay_s=0.002)
    reqs = [request(user="u1" if i % 2 else "u2", amount=float(i)) for i in range(40)]
    results = await asyncio.gather(*(s.one(r) for r in reqs))
    for i, p in enumerate(results):
        user = STORE[("user", "u1" if i % 2 else "u2")]
        row = [i, user["age"], 3, user["count"], 0.25]
        assert p.outputs["score"][0] == pytest.approx(expected_score(row, "2"))  # type: ignore[attr-defined]
    assert sum(s.features.calls) == 40 and len(s.features.calls) < 40
    assert sum(n for _, n in s.models.calls) == 40 and len(s.models.calls) < 40


async def test_predict_batch_agrees_with_single_predictions() -> None:
    s = Setup()
    rows = [gateway_pb2.PredictRow(entities={"user_id": u, "merchant_id": "m1"}) for u in ("u1", "u2", "u3")]
    for i, row in enumerate(rows):
        row.features["amount"].float_value = 10.0 * i
        row.features["hour"].float_value = 1.0
    batch = await s.predictor.predict("toy", "1", rows, CallInfo(), batch=True)
    for row, p in zip(rows, batch, strict=True):
        single = request(user=row.entities["user_id"], amount=row.features["amount"].float_value, hour=1.0)
        single.version = "1"
        one = await s.one(single)
        assert p.outputs["score"][0] == pytest.approx(one.outputs["score"][0])  # type: ignore[attr-defined]
        assert p.version == "1"


async def test_splits_explicit_versions_and_shadows() -> None:
    s = Setup(router=TrafficRouter(parse_platform(SPLIT), rng=random.Random(3)))
    results = [await s.one(request()) for _ in range(400)]
    counts = Counter(p.version for p in results)  # type: ignore[attr-defined]
    assert 0.04 < counts["2"] / 400 < 0.17
    records = {r.request_id: r for r in s.publisher.records}  # written before each answer
    for p in results:
        record = records[p.request_id]  # type: ignore[attr-defined]
        assert "score" in p.outputs and len(p.outputs) == 1  # type: ignore[attr-defined]
        if p.version == "1":  # type: ignore[attr-defined]
            assert record.shadow.model_version == "2"
            assert record.shadow.outputs["score"].float_value != record.outputs["score"].float_value
        else:
            assert not record.HasField("shadow")
    explicit = request()
    explicit.version = "1"
    assert (await s.one(explicit)).version == "1"  # type: ignore[attr-defined]


async def test_load_is_shed_past_the_in_flight_limit() -> None:
    s = Setup(max_in_flight_rows=3)
    s.models.gate = asyncio.Event()
    running = [asyncio.create_task(s.one(request())) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="overloaded"):
        await s.one(request())
    s.models.gate.set()
    await asyncio.gather(*running)
    await s.one(request())


async def test_load_is_shed_past_the_batcher_queue_limit() -> None:
    s = Setup(max_pending_rows=2, max_batch_rows=1)
    s.models.gate = asyncio.Event()
    running = [asyncio.create_task(s.one(request())) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted):
        await s.one(request())
    s.models.gate.set()
    await asyncio.gather(*running)


async def test_a_row_the_feature_source_refuses_fails_alone() -> None:
    s = Setup()
    real_fetch = s.features.fetch

    async def picky(spec: object, entities: list[dict[str, str]], timeout: float) -> object:
        if any(e["user_id"] == "bad" for e in entities):
            raise InvalidArgument("entities: user_id 'bad' is malformed")
        return await real_fetch(spec, entities, timeout)  # type: ignore[arg-type]

    s.features.fetch = picky  # type: ignore[method-assign]
    results = await asyncio.gather(
        s.one(request()), s.one(request(user="bad")), s.one(request(user="u2")), return_exceptions=True
    )
    assert isinstance(results[1], InvalidArgument) and "malformed" in str(results[1])
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)


def test_float32_rows() -> None:
    spec = toy_spec()
    assert spec.defaults.dtype == np.float32 and spec.width == 5
    assert spec.entity_keys == ("merchant_id", "user_id")
    assert list(spec.store_columns) == [1, 3, 4]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Tracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test")


async def test_stage_spans_are_children_of_the_incoming_call_when_sampled(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    s = Setup()
    s.predictor._tracer = tracer
    with tracer.start_as_current_span("Predict") as parent:
        await s.one(request())
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {"features", "inference", "publish"} <= set(spans)
    for name in ("features", "inference", "publish"):
        assert spans[name].parent is not None
        assert spans[name].parent.span_id == parent.get_span_context().span_id
        assert spans[name].start_time <= spans[name].end_time
    record = s.publisher.records[0]
    assert record.trace_id == format(parent.get_span_context().trace_id, "032x")


async def test_a_shadowed_rows_publish_span_joins_the_request_trace(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    s = Setup(router=TrafficRouter(parse_platform(ONLY_V1_WITH_SHADOW)))
    s.predictor._tracer = tracer
    with tracer.start_as_current_span("Predict") as parent:
        await s.one(request())
    assert s.publisher.records[0].shadow.model_version == "2"  # written, with the shadow, before the answer
    publish = [span for span in exporter.get_finished_spans() if span.name == "publish"]
    assert len(publish) == 1 and publish[0].parent is not None
    assert publish[0].parent.span_id == parent.get_span_context().span_id


async def test_a_batch_larger_than_the_models_max_batch_size_is_split_in_order() -> None:
    s = Setup()
    spec = toy_spec()
    s.predictor.catalog = ModelCatalog({"toy": dataclasses.replace(spec, max_batch_size=4)})
    rows = [gateway_pb2.PredictRow(entities={"user_id": "u1", "merchant_id": "m1"}) for _ in range(10)]
    for i, row in enumerate(rows):
        row.features["amount"].float_value = float(i)
        row.features["hour"].float_value = 3.0
    results = await s.predictor.predict("toy", "1", rows, CallInfo(), batch=True)
    for i, p in enumerate(results):
        assert p.outputs["score"][0] == pytest.approx(expected_score([i, 40, 3, 3, 0.25], "1"))
    assert all(n <= 4 for _, n in s.models.calls) and sum(n for _, n in s.models.calls) == 10


class GatedPublisher(ListPublisher):
    """Holds every write until `release` is set: a slow disk."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def write(self, record: logging_pb2.InferenceLogRecord) -> None:
        await self.release.wait()
        await super().write(record)


async def test_a_row_is_answered_only_after_its_record_was_written() -> None:
    s = Setup()
    s.publisher = publisher = GatedPublisher()
    s.predictor._publisher = publisher
    answer = asyncio.create_task(s.one(request()))
    await asyncio.sleep(0.05)
    assert not answer.done() and not publisher.records  # scored, but the record is not on disk yet
    publisher.release.set()
    prediction = await answer
    assert [r.request_id for r in publisher.records] == [prediction.request_id]  # type: ignore[attr-defined]


async def test_a_failed_log_write_fails_the_row_unavailable_instead_of_answering() -> None:
    s = Setup()
    s.publisher.failure = OSError(28, "No space left on device")
    with pytest.raises(Unavailable, match="log record could not be written"):
        await s.one(request())
    s.publisher.failure = None
    await s.one(request())  # the disk has room again: answers again


async def test_failure_and_degraded_records_are_written_before_the_answer() -> None:
    s = Setup()
    s.models.failure = Unavailable("inference is down (test)")
    req = request()
    req.request_id = "failing"
    with pytest.raises(Unavailable):
        await s.one(req)
    assert [(r.request_id, r.status_code) for r in s.publisher.records] == [("failing", 14)]
    s.models.failure = None
    s.features.failure = Unavailable("features are down (test)")
    await s.one(request())
    assert s.publisher.records[-1].degraded


async def test_a_shadow_slower_than_the_deadline_is_logged_as_deadline_exceeded() -> None:
    s = Setup(router=TrafficRouter(parse_platform(ONLY_V1_WITH_SHADOW)))
    real_infer = s.models.infer

    async def slow_shadow(spec: object, version: str, inputs: np.ndarray, timeout: float) -> object:
        if version == "2":
            await asyncio.sleep(10)
        return await real_infer(spec, version, inputs, timeout)  # type: ignore[arg-type]

    s.models.infer = slow_shadow  # type: ignore[method-assign]
    await s.one(request(), CallInfo(time_remaining=0.2))
    (record,) = s.publisher.records
    assert record.shadow.model_version == "2" and record.shadow.status_code == 4
