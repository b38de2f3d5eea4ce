"""GrpcFeatureSource: a real GetOnlineFeaturesResponse read into the batch's value, presence and time arrays,
and the trace context carried to a real feature server."""

from __future__ import annotations

import numpy as np
from opentelemetry import context, trace

from infergrid.features.v1 import features_pb2
from libs.channels import dial
from libs.pool import ChannelPool
from libs.resilience import Dependency, DependencyPolicy
from services.gateway.features import GrpcFeatureSource
from services.gateway.tests.fake_servers import FakeFeatureService, serve
from services.gateway.tests.fakes import toy_spec

PRESENT = features_pb2.FEATURE_STATUS_PRESENT
MISSING = features_pb2.FEATURE_STATUS_NOT_FOUND


def _column(
    reply: features_pb2.GetOnlineFeaturesResponse,
    name: str,
    cells: list[tuple[str, object, int]],
    stamps: list[tuple[int, int]] | None,
) -> None:
    reply.feature_names.append(name)
    vector = reply.results.add()
    for kind, value, status in cells:
        vector.values.add(**{kind: value})
        vector.statuses.append(status)
    for seconds, nanos in stamps or ():
        vector.event_timestamps.add(seconds=seconds, nanos=nanos)


def test_columns_in_spec_order_with_presence_times_and_unusable_columns_left_default() -> None:
    spec = toy_spec()  # store_refs: user:age, user:count, merchant:risk
    reply = features_pb2.GetOnlineFeaturesResponse()
    # Out of spec order; the second row's risk is missing; count has no event times; an unknown name and a
    # column of strings are skipped, as is a column of the wrong length.
    _column(reply, "merchant:risk", [("double_value", 0.5, PRESENT), ("double_value", 0.0, MISSING)],
            [(1_700_000_000, 123_456_000), (0, 0)])  # fmt: skip
    _column(reply, "user:count", [("int64_value", 7, PRESENT), ("int64_value", 9, PRESENT)], None)
    _column(reply, "user:unknown", [("float_value", 1.0, PRESENT), ("float_value", 2.0, PRESENT)], None)
    _column(reply, "user:age", [("string_value", "x", PRESENT), ("string_value", "y", PRESENT)], None)
    source = GrpcFeatureSource.__new__(GrpcFeatureSource)
    source._unreadable = set()
    got = source._decode(
        spec, features_pb2.GetOnlineFeaturesResponse.FromString(reply.SerializeToString()), 2
    )
    assert got.values.dtype == np.float32 and got.values.shape == (2, 3)
    np.testing.assert_array_equal(got.present, [[False, True, True], [False, True, False]])
    np.testing.assert_array_equal(got.values[:, 1], [7.0, 9.0])
    assert got.values[0, 2] == np.float32(0.5)
    assert got.event_us is not None
    np.testing.assert_array_equal(got.event_us, [[0, 0, 1_700_000_000_123_456], [0, 0, 0]])
    assert source._unreadable == {"user:age"}
    short = features_pb2.GetOnlineFeaturesResponse()
    _column(short, "user:count", [("int64_value", 7, PRESENT)], None)
    assert not source._decode(spec, short, 2).present.any()


async def test_each_call_carries_the_current_trace_context_sampled_or_not() -> None:
    service = FakeFeatureService()
    server, address = await serve(service)
    policy = DependencyPolicy(timeout_s=5.0)
    name = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
    pool = ChannelPool("features", lambda address: dial(address, name, policy), policy)
    pool.update([address])
    source = GrpcFeatureSource(pool, Dependency("features", policy))
    try:
        spec, rows = toy_spec(), [{"user_id": "u1", "merchant_id": "m1"}]
        await source.fetch(spec, rows, 5.0)  # no current trace: nothing to carry
        ids = trace.SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True)
        token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(ids)))
        try:
            await source.fetch(spec, rows, 5.0)
        finally:
            context.detach(token)
    finally:
        await source.close()
        await server.stop(0)
    assert service.traceparents == ["", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"]
