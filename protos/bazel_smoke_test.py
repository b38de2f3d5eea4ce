"""Smoke test: the generated protobuf/gRPC modules import and serve a real RPC (under Bazel and pytest)."""

from __future__ import annotations

import importlib
import os
import unittest
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from infergrid.types.v1 import value_pb2

# Every generated module the tree promises, by proto package path.
_MODULES = [
    "infergrid.types.v1.value_pb2",
    "infergrid.gateway.v1.gateway_pb2",
    "infergrid.gateway.v1.gateway_pb2_grpc",
    "infergrid.features.v1.features_pb2",
    "infergrid.features.v1.features_pb2_grpc",
    "infergrid.logging.v1.logging_pb2",
    "infergrid.logging.v1.logging_pb2_grpc",
    "inference.grpc_service_pb2",
    "inference.grpc_service_pb2_grpc",
    "inference.model_config_pb2",
]


def _descriptor_set_path() -> Path:
    """Returns descriptors.pb: Bazel's (a data dep, in the runfiles) or `make gen`'s."""
    if "TEST_SRCDIR" in os.environ:  # under `bazel test` the working dir is the runfiles root
        return Path("protos/descriptors.pb")
    return Path(__file__).resolve().parents[1] / "build" / "gen" / "descriptors.pb"


class _FeatureService(features_pb2_grpc.FeatureServiceServicer):
    """Answers GetFeatureView with one fixed view; NOT_FOUND for any other name."""

    async def GetFeatureView(  # noqa: N802 - the gRPC method name
        self, request: features_pb2.GetFeatureViewRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.FeatureView:
        if request.name != "user_stats":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"feature view {request.name!r} not found")
        return features_pb2.FeatureView(
            name="user_stats",
            entity=features_pb2.Entity(
                name="user",
                key_columns=[features_pb2.EntityKeyColumn(name="user_id", type=value_pb2.VALUE_TYPE_STRING)],
            ),
            features=[features_pb2.FeatureSpec(name="clicks_7d", type=value_pb2.VALUE_TYPE_INT64)],
            revision=3,
        )


class GeneratedCodeTest(unittest.TestCase):
    def test_all_generated_modules_import(self) -> None:
        for name in _MODULES:
            with self.subTest(module=name):
                importlib.import_module(name)

    def test_descriptor_round_trips(self) -> None:
        proto = descriptor_pb2.FileDescriptorProto()
        features_pb2.DESCRIPTOR.CopyToProto(proto)
        self.assertEqual(proto.package, "infergrid.features.v1")
        self.assertIn("FeatureService", [s.name for s in proto.service])

    def test_descriptor_set_loads_for_envoy(self) -> None:
        path = _descriptor_set_path()
        if not path.exists() and "TEST_SRCDIR" not in os.environ:
            self.skipTest(f"{path} not generated (make gen)")
        files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
        # --include_imports: the transcoder needs google/api/http.proto and friends in the set.
        self.assertIn("google/api/http.proto", [f.name for f in files])
        pool = descriptor_pool.DescriptorPool()
        for file in files:
            pool.Add(file)
        for service in ("infergrid.gateway.v1.PredictionService", "inference.GRPCInferenceService"):
            with self.subTest(service=service):
                pool.FindServiceByName(service)


class GrpcAioRoundTripTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.server = grpc.aio.server()
        features_pb2_grpc.add_FeatureServiceServicer_to_server(_FeatureService(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.assertNotEqual(port, 0, "could not bind a loopback port")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = features_pb2_grpc.FeatureServiceStub(self.channel)

    async def asyncTearDown(self) -> None:
        await self.channel.close()
        await self.server.stop(grace=None)

    async def test_get_feature_view(self) -> None:
        view = await self.stub.GetFeatureView(
            features_pb2.GetFeatureViewRequest(name="user_stats"), timeout=10
        )
        self.assertEqual(view.name, "user_stats")
        self.assertEqual(view.entity.key_columns[0].type, value_pb2.VALUE_TYPE_STRING)
        self.assertEqual([f.name for f in view.features], ["clicks_7d"])
        self.assertEqual(view.revision, 3)

    async def test_unknown_view_is_not_found(self) -> None:
        with self.assertRaises(grpc.aio.AioRpcError) as caught:
            await self.stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="nope"), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.NOT_FOUND)
        self.assertIn("nope", caught.exception.details())


if __name__ == "__main__":
    unittest.main()
