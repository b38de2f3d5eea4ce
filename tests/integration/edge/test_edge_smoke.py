import pytest

pytestmark = pytest.mark.integration


def test_grpc_reaches_upstream(edge_stack):
    reply = edge_stack.predict(key=edge_stack.keys["acme"])
    print(reply)
    assert reply.model == "fraud"
