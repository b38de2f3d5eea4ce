"""The demo loader against a features server on in-memory fakes: views applied, values readable, deterministic."""

from __future__ import annotations

import grpc
import numpy as np

from infergrid.features.v1 import features_pb2 as pb
from infergrid.features.v1 import features_pb2_grpc
from infergrid.types.v1.value_pb2 import Value, ValueList
from services.features.config import FeaturesConfig, FeaturesServerConfig
from services.features.registry import validate
from services.features.server import create_server
from services.features.tests.fakes import InMemoryCache, InMemoryOnlineStore, InMemoryViewStore
from stack import demo_features as demo


def test_views_are_valid_and_values_deterministic() -> None:
    for view in demo.VIEWS:
        validate(demo.feature_view(view))
        ids, first = demo.generate(view, 50)
        _, second = demo.generate(view, 50)
        _, more = demo.generate(view, 80)
        assert ids[0] == view.id_format.format(0)
        assert all(np.array_equal(first[k], second[k]) for k in first)
        # An entity's values do not depend on how many entities are generated.
        assert all(np.array_equal(first[k], more[k][:50]) for k in first)
    assert sum(len(v.features) for v in demo.VIEWS) == 24  # + 8 request features = the model's 32 inputs


async def test_load_applies_views_and_writes_values() -> None:
    server = await create_server(
        FeaturesConfig(server=FeaturesServerConfig(port=0)),
        store=InMemoryOnlineStore(),
        view_store=InMemoryViewStore(),
        cache=InMemoryCache(),
    )
    await server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        written = await demo.load(target, {"user": 1500, "merchant": 20, "device": 10}, timeout_s=10)
        assert written == {"user": 1500, "merchant": 20, "device": 10}
        again = await demo.load(target, {"user": 1500, "merchant": 20, "device": 10}, timeout_s=10)
        assert again == written
        async with grpc.aio.insecure_channel(target) as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            got = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    features=["user:avg_amount_30d", "merchant:category_risk"],
                    entities={
                        "user_id": ValueList(values=[Value(string_value="u01499")]),
                        "merchant_id": ValueList(values=[Value(string_value="m0019")]),
                    },
                )
            )
        _, users = demo.generate(demo.USER, 1500)
        _, merchants = demo.generate(demo.MERCHANT, 20)
        assert got.results[0].values[0].float_value == users["avg_amount_30d"][1499]
        assert got.results[1].values[0].float_value == merchants["category_risk"][19]
    finally:
        await server.stop(0, 0.5)
