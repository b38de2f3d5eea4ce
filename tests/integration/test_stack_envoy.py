"""The stack's Envoy serves a static route to a small upstream and reports ready on its admin endpoint."""

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stack.config import REPO_ROOT
from stack.probes import http_get
from tests.stack_fixtures import EnvoyFactory

pytestmark = pytest.mark.integration

STATIC_ROUTE = REPO_ROOT / "deploy" / "local" / "envoy" / "static-route.yaml"


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"upstream saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def upstream() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_static_route_reaches_the_upstream(
    envoy_factory: EnvoyFactory, upstream: ThreadingHTTPServer
) -> None:
    envoy = envoy_factory(STATIC_ROUTE, {"UPSTREAM_PORT": upstream.server_address[1]})

    answer = http_get(f"{envoy.public_url}/v1/ping?x=1")

    assert answer is not None
    assert answer.status == 200
    assert answer.body == "upstream saw /v1/ping?x=1"


def test_admin_reports_ready(envoy_factory: EnvoyFactory, upstream: ThreadingHTTPServer) -> None:
    envoy = envoy_factory(STATIC_ROUTE, {"UPSTREAM_PORT": upstream.server_address[1]})

    answer = http_get(f"{envoy.admin_url}/ready")

    assert answer is not None
    assert (answer.status, answer.body.strip()) == (200, "LIVE")
    assert "1.40" in envoy.version()
