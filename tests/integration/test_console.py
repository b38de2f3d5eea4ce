"""The operator console in a real headless browser (Debian's chromium through chromedriver and Selenium).

A real Prometheus scrapes a real gateway (with a real inference process behind it); predictions are sent;
the console's page loads and its request-rate chart draws points from Prometheus. INFERGRID_CONSOLE_SCREENSHOT
names a PNG to save the page to (the README's docs/console.png comes from here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.testing import free_port, spawn_module, stop_process, wait_serving
from stack.config import StackConfig
from stack.prometheus import Prometheus, write_targets
from tests.deploy.test_deploy_metrics import Running, _gateway_env, _predict

pytestmark = pytest.mark.integration


@pytest.fixture
def prometheus(stack_config: StackConfig, tmp_path: Path) -> Iterator[Prometheus]:
    config = dataclasses.replace(stack_config, state_dir=tmp_path / "state")
    server = Prometheus(config, ports={"prometheus": free_port()})
    server.start()
    yield server
    server.stop()


def test_console_page_renders_charts_with_data(
    prometheus: Prometheus, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("chromium/chromium-driver missing: tools/setup.sh installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from services.gateway.server import SERVICE_NAME

    gateway = Running("gateway", _gateway_env(request, tmp_path))
    console_port = free_port()
    console = spawn_module(
        "services.console",
        {
            "INFERGRID_CONSOLE_PORT": str(console_port),
            "INFERGRID_CONSOLE_PROMETHEUS_URL": prometheus.url,
            "INFERGRID_CONSOLE_JAEGER_URL": f"http://127.0.0.1:{free_port()}",
        },
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    browser = None
    try:
        asyncio.run(wait_serving(gateway.port, SERVICE_NAME, gateway.proc, timeout=120))
        write_targets(
            prometheus.config, "static", [("gateway-0", "gateway", f"127.0.0.1:{gateway.metrics_port}")]
        )
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        deadline = time.monotonic() + 90
        points = 0
        while time.monotonic() < deadline and points < 2:
            for _ in range(5):
                asyncio.run(_predict(gateway.port))
            browser.get(f"http://127.0.0.1:{console_port}/")
            time.sleep(3)
            points = int(browser.find_element("id", "rps").get_attribute("data-points") or 0)
        assert browser.title == "InferGrid console"
        assert points >= 2, "the request-rate chart drew no data"
        assert "gateway-0" in browser.find_element("id", "services").text
        screenshot = os.environ.get("INFERGRID_CONSOLE_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)
    finally:
        if browser is not None:
            browser.quit()
        stop_process(console)
        stop_process(gateway.proc)
