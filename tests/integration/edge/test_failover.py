"""One of two gateway replicas killed under load: health checks, outlier detection and retries hide it."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest

from tests.integration.edge.conftest import EdgeStack, _spawn, _wait_serving

pytestmark = pytest.mark.integration

LOAD_SECONDS = 4.0
KILL_AFTER_SECONDS = 1.0
CLIENTS = 4


def _healthy_hosts(stack: EdgeStack) -> int:
    answer = stack.stats("cluster.gateway.membership_healthy")
    return int(answer.get("cluster.gateway.membership_healthy", "0") or 0)


def test_killing_one_of_two_replicas_under_load_costs_almost_no_errors(edge_stack: EdgeStack) -> None:
    key = edge_stack.keys["acme"]
    edge_stack.wait_for(lambda: _healthy_hosts(edge_stack) == 2, what="both replicas healthy")
    outcomes: Counter[str] = Counter()
    served_by: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + LOAD_SECONDS

    def _client() -> None:
        channel = grpc.insecure_channel(edge_stack.target)
        from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

        stub = gateway_pb2_grpc.PredictionServiceStub(channel)
        while time.monotonic() < stop_at:
            try:
                reply = stub.Predict(
                    gateway_pb2.PredictRequest(model="fraud"), metadata=[("x-api-key", key)], timeout=5
                )
                result, replica = "OK", reply.model_version
            except grpc.RpcError as err:
                result, replica = err.code().name, ""
            with lock:
                outcomes[result] += 1
                if replica:
                    served_by[replica] += 1
        channel.close()

    victim = edge_stack.upstreams["replica-a"]
    threads = [threading.Thread(target=_client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(KILL_AFTER_SECONDS)
    victim.proc.kill()
    for thread in threads:
        thread.join(timeout=LOAD_SECONDS + 10)

    # Bring the replica back for whoever runs next.
    edge_stack.upstreams["replica-a"] = _spawn(
        "tests.integration.edge.upstream",
        {"UPSTREAM_PORT": str(victim.port), "UPSTREAM_NAME": "replica-a"},
        victim.log,
        victim.port,
    )
    _wait_serving(edge_stack.upstreams["replica-a"])

    total = sum(outcomes.values())
    errors = total - outcomes["OK"]
    print(f"failover: {total} calls, {errors} errors {dict(outcomes)}, served by {dict(served_by)}")
    assert total > 100
    assert served_by["replica-a"] > 0 and served_by["replica-b"] > 0
    assert errors <= max(2, total // 200), dict(outcomes)
