"""Bad writes against the real Cassandra: refused as the caller's error, never opening the breaker that guards reads."""

from __future__ import annotations

import dataclasses

import pytest

from infergrid.types.v1 import value_pb2
from libs.errors import InvalidArgument
from services.features import codec
from services.features.config import FeaturesConfig, StoreConfig
from services.features.online import RowInput
from services.features.store import WriteRow
from services.features.tests.views import typed_view
from services.features.wiring import open_feature_store


async def test_writes_cassandra_refuses_never_open_the_breaker(features_config: FeaturesConfig) -> None:
    # Rows that skip prepare_rows (write_bounds would refuse them first), so that Cassandra itself
    # refuses them and the last line answers: store.py's InvalidRequest -> INVALID_ARGUMENT.
    config = dataclasses.replace(features_config, store=StoreConfig(store_max_attempts=1))
    features = open_feature_store(config)
    await features.open()
    try:
        view, _ = await features.registry.apply(typed_view("bad_writes"))
        online = features.online
        good = online.prepare_rows(
            view,
            [
                RowInput(
                    {"id": value_pb2.Value(string_value="a")}, {"f_int64": value_pb2.Value(int64_value=7)}
                )
            ],
        )
        await online.write(view, good)
        # Long.MIN_VALUE as the write timestamp: Cassandra answers InvalidRequest.
        bad = [WriteRow(good[0].key, {"f_int64": codec.cell(-(2**63), b"")}, -(2**63))]
        for _ in range(3 * config.store.store_breaker_failures):
            with pytest.raises(InvalidArgument, match="the store refused the write"):
                await online.write(view, bad)
        assert not online._cassandra.breaker_open
        records = await online._read_store(view, [good[0].key])
        assert good[0].key in records and online.store_ok
    finally:
        await features.close()
