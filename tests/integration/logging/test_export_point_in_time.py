"""No future leakage: a training set exported from the log holds the feature values the model saw.

The real feature service (in this process, on the session's Cassandra and Redis) serves the
gateway's real predictor through its real gRPC feature client; the model is the gateway tests'
in-memory one (scoring is not the point) and the records go into a real Parquet lake. After the
predictions the features are REWRITTEN with new values and later event times; the export must still
hold the values each prediction used, never the rewritten ones (by request id and as of label times).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from infergrid.gateway.v1 import gateway_pb2
from infergrid.logging.v1 import logging_pb2
from infergrid.types.v1 import value_pb2
from libs.channels import dial
from libs.pool import ChannelPool
from libs.resilience import Dependency, DependencyPolicy, RetryPolicy
from libs.server import Server
from libs.testing import wait_serving
from services.features.server import SERVICE_NAME, create_server
from services.gateway.catalog import ModelCatalog
from services.gateway.config import UpstreamConfig
from services.gateway.features import GrpcFeatureSource
from services.gateway.predictor import CallInfo, Predictor
from services.gateway.routing import TrafficRouter
from services.gateway.tests.fakes import FakeModels, toy_spec
from services.logging import export
from services.logging.lake import ParquetLake
from stack.cassandra import Cassandra
from stack.redis import Redis
from tests.integration.features.features_harness import features_config

pytestmark = pytest.mark.integration

S = 1_000_000
USERS = ("u1", "u2", "u3")
VT = value_pb2.ValueType


class LakePublisher:
    """The gateway's RecordPublisher role, writing straight into a real Parquet lake (no Kafka here)."""

    def __init__(self, root: Path) -> None:
        self.lake = ParquetLake(root, "log", roll_bytes=1 << 30, roll_seconds=3600.0)
        self.offset = 0

    async def write(self, record: logging_pb2.InferenceLogRecord) -> None:
        self.lake.add(0, self.offset, record, record.SerializeToString())
        self.offset += 1


@dataclass
class Env:
    stub: features_pb2_grpc.FeatureServiceStub
    predictor: Predictor
    publisher: LakePublisher
    root: Path


@pytest.fixture
async def env(tmp_path: Path, cassandra_server: Cassandra, redis_server: Redis) -> AsyncIterator[Env]:
    tag = uuid.uuid4().hex[:8]
    keyspace = f"export_it_{os.getpid()}_{tag}"
    config = features_config(cassandra_server, redis_server, keyspace, f"ex{tag}:", 5.0)
    server: Server = await create_server(config)
    await server.start()
    policy = DependencyPolicy(timeout_s=5.0, retry=RetryPolicy(max_attempts=1))
    pool = ChannelPool("features", lambda address: dial(address, SERVICE_NAME, policy), policy)
    try:
        await wait_serving(server.port, SERVICE_NAME, timeout=90)
        pool.update([f"127.0.0.1:{server.port}"])
        publisher = LakePublisher(tmp_path / "lake")
        predictor = Predictor(
            ModelCatalog({"toy": toy_spec()}),
            TrafficRouter(),
            GrpcFeatureSource(pool, Dependency("features", policy)),
            FakeModels(),
            publisher,
            # A loaded 2-core box: give the real feature service time rather than serve defaults.
            upstream=UpstreamConfig(features_timeout_s=5.0, inference_timeout_s=5.0, request_timeout_s=15.0),
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            for view, key, names in (
                ("user", "user_id", ("age", "count")),
                ("merchant", "merchant_id", ("risk",)),
            ):
                await stub.ApplyFeatureView(
                    features_pb2.ApplyFeatureViewRequest(
                        feature_view=features_pb2.FeatureView(
                            name=view,
                            entity=features_pb2.Entity(
                                name=view,
                                key_columns=[
                                    features_pb2.EntityKeyColumn(name=key, type=VT.VALUE_TYPE_STRING)
                                ],
                            ),
                            features=[
                                features_pb2.FeatureSpec(name=n, type=VT.VALUE_TYPE_DOUBLE) for n in names
                            ],
                        )
                    ),
                    timeout=30,
                )
            yield Env(stub, predictor, publisher, tmp_path)
            await predictor.close()
    finally:
        await pool.close()
        await server.stop(0, 1.0)


async def _write(
    stub: features_pb2_grpc.FeatureServiceStub,
    view: str,
    key: str,
    rows: dict[str, dict[str, float]],
    event_us: int,
) -> None:
    request = features_pb2.WriteFeaturesRequest(feature_view=view)
    for entity, values in rows.items():
        row = request.rows.add()
        row.entity_key[key].string_value = entity
        for name, value in values.items():
            row.values[name].double_value = value
        row.event_timestamp.FromMicroseconds(event_us)
    await stub.WriteFeatures(request, timeout=30)


async def _wait_for_age(stub: features_pb2_grpc.FeatureServiceStub, user: str, age: float) -> None:
    """Until the store serves the rewritten value (writes drop the cache entries; a fill may race)."""
    deadline = time.monotonic() + 30
    while True:
        request = features_pb2.GetOnlineFeaturesRequest(features=["user:age"])
        request.entities["user_id"].values.add(string_value=user)
        reply = await stub.GetOnlineFeatures(request, timeout=10)
        if reply.results[0].values[0].double_value == age:
            return
        assert time.monotonic() < deadline, f"the store never served {user}'s rewritten age {age}"
        await asyncio.sleep(0.2)


async def _predict(env: Env, request_id: str, user: str) -> None:
    req = gateway_pb2.PredictRequest(
        model="toy", request_id=request_id, entities={"user_id": user, "merchant_id": "m1"}
    )
    req.features["amount"].float_value = 5.0
    req.features["hour"].float_value = 3.0
    (prediction,) = await env.predictor.predict("toy", "", [req], CallInfo(tenant="acme"))
    assert not prediction.degraded_features, prediction.degraded_features


def _export(env: Env, labels: pa.Table, name: str, *extra: str) -> list[dict[str, object]]:
    labels_path = env.root / f"{name}.parquet"
    pq.write_table(labels, labels_path)
    out = env.root / f"{name}-train.parquet"
    argv = [
        "--lake",
        str(env.root / "lake"),
        "--model",
        "toy",
        "--labels",
        str(labels_path),
        "--output",
        str(out),
    ]
    assert export.main([*argv, *extra]) == 0
    return pq.read_table(out).to_pylist()


def _times(*us: int) -> pa.Array:
    return pa.array(list(us), pa.int64()).cast(pa.timestamp("us", tz="UTC"))


async def test_features_rewritten_after_the_predictions_never_reach_the_training_set(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    old_event = time.time_ns() // 1000 - 3600 * S
    await _write(
        env.stub,
        "user",
        "user_id",
        {u: {"age": 10.0 + i, "count": 1.0 + i} for i, u in enumerate(USERS)},
        old_event,
    )
    await _write(env.stub, "merchant", "merchant_id", {"m1": {"risk": 0.5}}, old_event)
    # u4's value claims to be from two minutes in the future (the store refuses more than its clock skew
    # allows): the model sees it, the export must not keep it.
    future_event = time.time_ns() // 1000 + 120 * S
    await _write(env.stub, "user", "user_id", {"u4": {"age": 99.0, "count": 9.0}}, future_event)

    before_predictions = time.time_ns() // 1000
    for user in USERS:
        await _predict(env, f"p-{user}", user)
    await _predict(env, "p-u1-second", "u1")
    await _predict(env, "p-u4", "u4")
    after_predictions = time.time_ns() // 1000

    # REWRITE every user with new values and later event times, then let the model see the new u1 once.
    rewrite_event = time.time_ns() // 1000 + S
    await _write(
        env.stub,
        "user",
        "user_id",
        {u: {"age": 1000.0 + i, "count": 500.0 + i} for i, u in enumerate(USERS)},
        rewrite_event,
    )
    for i, user in enumerate(USERS):
        await _wait_for_age(env.stub, user, 1000.0 + i)
    await asyncio.sleep(rewrite_event / S - time.time() + 0.01)  # past the rewrite's event time
    await _predict(env, "p-u1-after", "u1")
    after_rewrite = time.time_ns() // 1000
    env.publisher.lake.flush()

    # By request id: each row holds what its prediction used, with the event time the store had.
    by_id = pa.table(
        {
            "request_id": ["p-u1", "p-u2", "p-u3", "p-u1-second", "p-u4", "p-u1-after"],
            "label": [1, 0, 1, 0, 1, 1],
        }
    )
    rows = _export(env, by_id, "by-id")
    summary = json.loads(capsys.readouterr().out)
    got = {r["request_id"]: r for r in rows}
    assert set(got) == {"p-u1", "p-u2", "p-u3", "p-u1-second", "p-u1-after"}  # p-u4: a future event time
    assert summary["future_rows"] == 1 and summary["future_features"] == {"user:age": 1, "user:count": 1}
    for i, user in enumerate(USERS):
        row = got[f"p-{user}"]
        assert (row["user:age"], row["user:count"], row["merchant:risk"]) == (10.0 + i, 1.0 + i, 0.5)
        assert row["amount"] == 5.0 and row["hour"] == 3.0
        times = dict(row["feature_event_times"])  # type: ignore[call-overload]
        assert {k: int(v.timestamp() * S) for k, v in times.items()} == {
            "user:age": old_event, "user:count": old_event, "merchant:risk": old_event,
        }  # fmt: skip
        assert all(v <= row["request_time"] for v in times.values())
    assert got["p-u1-second"]["user:age"] == 10.0
    assert got["p-u1-after"]["user:age"] == 1000.0  # what the model saw then: the rewritten value
    assert not any(r["user:age"] >= 1000.0 for k, r in got.items() if k != "p-u1-after")  # type: ignore[operator]

    # The same with the future row kept and flagged.
    rows = _export(env, by_id, "flagged", "--future-features", "flag")
    capsys.readouterr()
    flagged = {r["request_id"]: r["future_features"] for r in rows}
    assert flagged["p-u4"] == ["user:age", "user:count"] and flagged["p-u1"] == []

    # As of label times: the latest prediction at or before each label, never a later one.
    as_of = pa.table(
        {
            "user_id": ["u1", "u1", "u2", "u3", "u1"],
            "label": [10, 11, 12, 13, 14],
            "label_time": _times(
                before_predictions - S, after_predictions, after_predictions, after_predictions, after_rewrite
            ),
        }
    )
    rows = _export(env, as_of, "as-of")
    summary = json.loads(capsys.readouterr().out)
    got_as_of = {r["label"]: (r["request_id"], r["user:age"]) for r in rows}
    assert got_as_of == {
        # 10: before every prediction of u1 -> no row (unmatched)
        11: ("p-u1-second", 10.0),  # the latest before the rewrite, with the value it saw
        12: ("p-u2", 11.0),
        13: ("p-u3", 12.0),
        14: ("p-u1-after", 1000.0),  # after the rewrite: the prediction that saw the new value
    }
    assert summary["join"] == "as_of" and summary["unmatched_labels"] == 1
