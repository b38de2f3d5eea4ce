"""`python -m services.features.materialize` against real Cassandra and Redis: 100k Parquet rows, rerun, CSV."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infergrid.features.v1 import features_pb2 as pb
from infergrid.features.v1 import features_pb2_grpc
from infergrid.types.v1.value_pb2 import ValueList
from libs.checkout import checkout_env
from libs.testing import REPO_ROOT
from services.features.config import FeaturesConfig
from services.features.tests.views import VT, V

pytestmark = pytest.mark.integration
ROWS = 100_000
Stub = features_pb2_grpc.FeatureServiceStub


def _env(config: FeaturesConfig) -> dict[str, str]:
    c = config.cassandra
    return {
        "INFERGRID_FEATURES_CASSANDRA_CONTACT_POINTS": ",".join(c.cassandra_contact_points),
        "INFERGRID_FEATURES_CASSANDRA_PORT": str(c.cassandra_port),
        "INFERGRID_FEATURES_CASSANDRA_USERNAME": c.cassandra_username,
        "INFERGRID_FEATURES_CASSANDRA_PASSWORD": c.cassandra_password,
        "INFERGRID_FEATURES_CASSANDRA_KEYSPACE": c.cassandra_keyspace,
        "INFERGRID_FEATURES_REDIS_URL": config.cache.redis_url,
        "INFERGRID_FEATURES_CACHE_KEY_PREFIX": config.cache.cache_key_prefix,
        "INFERGRID_FEATURES_LOG_JSON": "false",
    }


def _run(config: FeaturesConfig, *args: str) -> str:
    env = checkout_env(_env(config))
    done = subprocess.run(
        [sys.executable, "-m", "services.features.materialize", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _view(name: str) -> pb.FeatureView:
    return pb.FeatureView(
        name=name,
        entity=pb.Entity(
            name="user", key_columns=[pb.EntityKeyColumn(name="user_id", type=VT.VALUE_TYPE_STRING)]
        ),
        features=[
            pb.FeatureSpec(name="score", type=VT.VALUE_TYPE_FLOAT),
            pb.FeatureSpec(name="count", type=VT.VALUE_TYPE_INT64),
            pb.FeatureSpec(name="label", type=VT.VALUE_TYPE_STRING),
        ],
    )


async def _digest(stub: Stub, view: str, ids: list[str]) -> tuple[str, int]:
    """A hash of every value and event time of `ids`, and how many rows were present."""
    digest = hashlib.sha256()
    present = 0
    refs = [f"{view}:score", f"{view}:count", f"{view}:label"]
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        got = await stub.GetOnlineFeatures(
            pb.GetOnlineFeaturesRequest(
                features=refs, entities={"user_id": ValueList(values=[V(string_value=i) for i in chunk])}
            )
        )
        for vector in got.results:
            digest.update(b"".join(v.SerializeToString() for v in vector.values))
            digest.update(b"".join(t.SerializeToString() for t in vector.event_timestamps))
        present += sum(1 for s in got.results[0].statuses if s == pb.FEATURE_STATUS_PRESENT)
        for i, user in enumerate(chunk[:3]):
            n = int(user.removeprefix("u"))
            assert got.results[0].values[i].float_value == np.float32(n / 7)
            assert got.results[1].values[i].int64_value == n * 3
            assert got.results[2].values[i].string_value == f"label-{n % 13}"
    return digest.hexdigest(), present


async def test_materializing_100k_parquet_rows_loads_all_and_rerunning_changes_nothing(
    features_stub: Stub, features_config: FeaturesConfig, tmp_path: Path
) -> None:
    view = f"mat_{uuid.uuid4().hex[:8]}"
    await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=_view(view)))
    n = np.arange(ROWS)
    table = pa.table(
        {
            "user_id": pa.array([f"u{i}" for i in n]),
            "score": pa.array((n / 7).astype(np.float32)),
            "count": pa.array(n * 3, type=pa.int64()),
            "label": pa.array([f"label-{i % 13}" for i in n]),
            "event_timestamp": pa.array((1_760_000_000_000_000 + n).astype("datetime64[us]")),
        }
    )
    path = tmp_path / "users.parquet"
    pq.write_table(table, path, row_group_size=25_000)
    ids = [f"u{i}" for i in n]

    started = time.monotonic()
    out = _run(features_config, "--view", view, "--file", str(path), "--no-progress")
    first_s = time.monotonic() - started
    assert f"loaded {ROWS} rows ({3 * ROWS} values)" in out, out
    first, present = await _digest(features_stub, view, ids)
    assert present == ROWS

    out = _run(features_config, "--view", view, "--file", str(path), "--no-progress")
    again, present = await _digest(features_stub, view, ids)
    assert present == ROWS
    assert again == first
    print(f"materialized {ROWS} rows in {first_s:.1f}s")


async def test_materializing_csv_and_refusing_unknown_columns(
    features_stub: Stub, features_config: FeaturesConfig, tmp_path: Path
) -> None:
    view = f"csv_{uuid.uuid4().hex[:8]}"
    await features_stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=_view(view)))
    path = tmp_path / "users.csv"
    path.write_text("user_id,score,count,label\n007,0.5,3,a\n008,,4,b\n")
    out = _run(features_config, "--view", view, "--file", str(path))
    assert "loaded 2 rows (5 values)" in out
    got = await features_stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(
            features=[f"{view}:score", f"{view}:count"],
            entities={"user_id": ValueList(values=[V(string_value="007"), V(string_value="008")])},
        )
    )
    assert got.results[0].values[0].float_value == 0.5
    assert list(got.results[0].statuses) == [pb.FEATURE_STATUS_PRESENT, pb.FEATURE_STATUS_NOT_FOUND]
    assert [v.int64_value for v in got.results[1].values] == [3, 4]
