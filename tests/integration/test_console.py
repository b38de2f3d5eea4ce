"""The operator console in a real headless browser (Debian's chromium through chromedriver and Selenium).

Real processes behind it: a Prometheus scraping a gateway (with a traffic split, a shadow version and
admission by API key), its inference process, the feature service with the demo feature views, the
feature stream ingester and the inference-log consumer, with Jaeger collecting the gateway's traces.
Predictions are sent through the gateway, a bad feature update goes to the stream; then the page must
show every section with data: the request-rate chart, the models with their route and shadow, the
feature views with their last write, the pipeline's lag and dead letters, and the recent traces.
INFERGRID_CONSOLE_SCREENSHOT names a PNG to save the page to, with a trace's waterfall open (the README's
docs/console.png: `INFERGRID_CONSOLE_SCREENSHOT=docs/console.png pytest tests/integration/test_console.py`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from libs.apikeys import hash_key, new_key
from libs.testing import free_port, spawn_module, stop_process
from stack.demo import DEMO_ENTITIES, DEMO_REQUEST_FEATURES
from stack.kafka import Kafka, credential_env
from stack.prometheus import Prometheus
from stack.services import INPUT_LAYOUTS
from tests.deploy.service_processes import (
    Running,
    _features_env,
    _features_ingest_env,
    _gateway_env,
    _logging_env,
    scrape_when_ready,
)

pytestmark = pytest.mark.integration

PLATFORM = """
admission: {placement: gateway}
api_keys_file: keys.yaml
rate_limit_tiers:
  standard: {requests_per_second: 2000, burst: 4000}
tenants:
  demo: {tier: standard, models: [fraud]}
models:
  fraud:
    versions: [{version: "1", weight: 80}, {version: "2", weight: 20}]
    shadow: "2"
"""
# Demo entities to load: enough for DEMO_ENTITIES' ids (u00042, m0007, d00042).
DEMO_COUNTS = {"user": 100, "merchant": 20, "device": 100}


async def _predictions(port: int, key: str, count: int) -> None:
    """`count` demo predictions through the gateway with the demo tenant's key; each must succeed."""
    from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from infergrid.types.v1 import value_pb2

    features = {k: value_pb2.Value(double_value=float(v)) for k, v in DEMO_REQUEST_FEATURES.items()}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gateway_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(count):
            await stub.Predict(
                gateway_pb2.PredictRequest(model="fraud", entities=DEMO_ENTITIES, features=features),
                metadata=[("x-api-key", key)],
                timeout=10,
            )


def _stream_records(kafka: Kafka, topic: str) -> None:
    """The ingester's topics, one good feature update and one record that is not one (a dead letter)."""
    admin = AdminClient(kafka.client_conf())
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in (topic, f"{topic}.dlq")]).values():
        future.result(timeout=30)
    producer = Producer(kafka.client_conf())
    good = (
        '{"featureView": "device", "rows": [{"entityKey": {"device_id": {"stringValue": "d00001"}}, '
        '"values": {"risk_score": {"floatValue": 0.5}}}]}'
    )
    producer.produce(topic, good.encode())
    producer.produce(topic, b"not a feature update")
    assert producer.flush(30) == 0


def _cell(browser: Any, element_id: str) -> str:
    return str(browser.find_element("id", element_id).text)


def _rows(browser: Any, table_id: str) -> list[list[str]]:
    """The table's data rows, each as its cells' text."""
    return [
        [td.text for td in tr.find_elements("css selector", "td")]
        for tr in browser.find_elements("css selector", f"#{table_id} tr")
    ][1:]


def test_console_shows_every_section_with_data(
    prometheus: Prometheus, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("chromium/chromium-driver missing: tools/setup.sh installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from stack import demo_features as features_demo

    jaeger = request.getfixturevalue("jaeger_server")
    redis = request.getfixturevalue("redis_server")
    kafka = request.getfixturevalue("kafka_server")
    started: list[Running] = []
    console = None
    browser = None
    try:
        features = Running("features", _features_env(request, tmp_path))
        started.append(features)
        features.wait_ready()
        asyncio.run(features_demo.load(f"127.0.0.1:{features.port}", DEMO_COUNTS))

        ingest_env = _features_ingest_env(request, tmp_path)
        _stream_records(kafka, ingest_env["INFERGRID_FEATURES_STREAM_TOPIC"])
        started.append(Running("features-ingest", ingest_env))
        logging_env = _logging_env(request, tmp_path)
        started.append(Running("logging", logging_env))

        key = new_key()
        platform = tmp_path / "platform" / "platform.yaml"
        platform.parent.mkdir()
        platform.write_text(PLATFORM)
        (platform.parent / "keys.yaml").write_text(
            f"keys:\n  - {{name: console, tenant: demo, sha256: {hash_key(key)}}}\n"
        )
        gateway = Running(
            "gateway",
            {
                **_gateway_env(request, tmp_path),
                "INFERGRID_GATEWAY_FEATURES_TARGET": f"127.0.0.1:{features.port}",
                "INFERGRID_GATEWAY_PLATFORM_FILE": str(platform),
                "INFERGRID_GATEWAY_INPUT_LAYOUTS": str(INPUT_LAYOUTS),
                "INFERGRID_GATEWAY_ADMISSION_REDIS_URL": redis.url,
                "INFERGRID_GATEWAY_INFERENCE_LOG_ENABLED": "true",
                "INFERGRID_GATEWAY_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                **credential_env(kafka.config, "admin", "INFERGRID_GATEWAY_"),
                "INFERGRID_GATEWAY_INFERENCE_LOG_TOPIC": logging_env["INFERGRID_LOGGING_TOPIC"],
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{jaeger.otlp_grpc_endpoint}",
            },
        )
        started.append(gateway)
        scrape_when_ready(prometheus, started)
        console_port = free_port()
        console = spawn_module(
            "services.console",
            {
                "INFERGRID_CONSOLE_PORT": str(console_port),
                "INFERGRID_CONSOLE_PROMETHEUS_URL": prometheus.url,
                "INFERGRID_CONSOLE_JAEGER_URL": jaeger.query_url,
                "INFERGRID_CONSOLE_FEATURES_TARGET": f"127.0.0.1:{features.port}",
            },
        )
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(driver_path), options=options)

        def _shown() -> dict[str, bool]:
            models = {tuple(row[:3]) for row in _rows(browser, "models")}
            views = {row[0]: row for row in _rows(browser, "features")}
            return {
                "rps chart": int(browser.find_element("id", "rps").get_attribute("data-points") or 0) >= 2,
                "p99 chart": int(browser.find_element("id", "p99").get_attribute("data-points") or 0) >= 2,
                "route 80 %": ("fraud", "1", "80.00 %") in models,
                "route 20 %": ("fraud", "2", "20.00 %") in models,
                "shadow": ("fraud", "2", "shadow") in models,
                "feature views": set(DEMO_COUNTS) <= set(views),
                "last write": all(views[v][-1].endswith(" ago") for v in DEMO_COUNTS if v in views),
                "logging lag": _cell(browser, "lag").isdigit(),
                "logging dead letters": _cell(browser, "dlq").isdigit(),
                "stream lag": _cell(browser, "flag").isdigit(),
                "stream dead letter": _cell(browser, "fdlq") == "1",
                "services": "gateway-0" in _cell(browser, "services"),
                "recent traces": len(browser.find_elements("css selector", "#recent a")) > 0,
            }

        deadline = time.monotonic() + 120
        shown: dict[str, bool] = {}
        while time.monotonic() < deadline:
            asyncio.run(_predictions(gateway.port, key, 10))
            browser.get(f"http://127.0.0.1:{console_port}/")
            time.sleep(3)
            shown = _shown()
            if all(shown.values()):
                break
        assert browser.title == "InferGrid console"
        assert all(shown.values()), f"sections without data: {[k for k, v in shown.items() if not v]}"
        # A trace opens as a waterfall of the gateway's spans.
        browser.find_elements("css selector", "#recent a")[0].click()
        time.sleep(2)
        assert browser.find_elements("css selector", "#waterfall rect"), "the waterfall drew no spans"
        screenshot = os.environ.get("INFERGRID_CONSOLE_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)
    finally:
        if browser is not None:
            browser.quit()
        if console is not None:
            stop_process(console)
        for service in started:
            stop_process(service.proc)
