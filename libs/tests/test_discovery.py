"""Endpoint discovery: target syntax, files (missing, malformed, rewritten), DNS names, the watcher."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from libs.discovery import (
    EndpointWatcher,
    FileTarget,
    HostPort,
    Resolver,
    TargetError,
    parse_targets,
)


async def resolve_targets(spec: str) -> tuple[str, ...]:
    return await Resolver().resolve(parse_targets(spec))


def _write(path: Path, endpoints: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"endpoints": endpoints}) if isinstance(endpoints, list) else str(endpoints))
    tmp.replace(path)  # atomically, as the stack's supervisor does


def test_target_syntax(tmp_path: Path) -> None:
    targets = parse_targets(
        "10.0.0.1:1, dns:///svc-headless:8001,dns:other:2,[::1]:3,file:/abs/e.json,file:rel.json", tmp_path
    )
    assert targets == (
        HostPort("10.0.0.1", 1),
        HostPort("svc-headless", 8001),
        HostPort("other", 2),
        HostPort("::1", 3),
        FileTarget(Path("/abs/e.json")),
        FileTarget(tmp_path / "rel.json"),
    )
    assert [str(t) for t in targets[:1] + targets[3:5]] == ["10.0.0.1:1", "[::1]:3", "file:/abs/e.json"]


@pytest.mark.parametrize("spec", ["", " , ", "host", "host:0", "host:99999", "host:x", "file:", "a:b:1"])
def test_malformed_targets_name_the_entry(spec: str) -> None:
    with pytest.raises(TargetError):
        parse_targets(spec)


async def test_ip_literals_resolve_to_themselves_sorted_and_deduplicated() -> None:
    assert await resolve_targets("127.0.0.2:2,127.0.0.1:1,127.0.0.2:2") == ("127.0.0.1:1", "127.0.0.2:2")


async def test_a_dns_name_resolves_to_its_addresses() -> None:
    assert await resolve_targets("localhost:50051") == ("127.0.0.1:50051",)
    assert await resolve_targets("dns:///localhost:7,127.0.0.9:7") == ("127.0.0.1:7", "127.0.0.9:7")


async def test_a_name_that_does_not_exist_has_no_endpoints() -> None:
    assert await resolve_targets("no-such-host.invalid:1") == ()


async def test_files_missing_malformed_and_rewritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gw.json"
    seen: list[tuple[str, ...]] = []
    watcher = EndpointWatcher(f"file:{path.name}", seen.append, base_dir=tmp_path)

    with caplog.at_level(logging.WARNING):
        assert await watcher.refresh() is True  # missing: no endpoints (a change from "unknown")
        assert await watcher.refresh() is False
    assert watcher.current == ()
    assert sum("does not exist" in r.message for r in caplog.records) == 1  # logged once

    _write(path, ["127.0.0.1:2", "127.0.0.1:1"])
    assert await watcher.refresh() is True
    assert watcher.current == ("127.0.0.1:1", "127.0.0.1:2")

    for bad in ("{not json", '{"endpoints": "x"}', '{"endpoints": ["nope"]}'):
        caplog.clear()
        _write(path, bad)
        with caplog.at_level(logging.ERROR):
            assert await watcher.refresh() is False  # the last good list stays
        assert watcher.current == ("127.0.0.1:1", "127.0.0.1:2")
        assert "rejected" in caplog.text

    _write(path, ["127.0.0.1:1", "127.0.0.1:3"])
    assert await watcher.refresh() is True
    path.unlink()
    assert await watcher.refresh() is True
    assert seen == [(), ("127.0.0.1:1", "127.0.0.1:2"), ("127.0.0.1:1", "127.0.0.1:3"), ()]


async def test_the_watcher_reports_only_changes_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    _write(path, ["127.0.0.1:1"])
    changes: asyncio.Queue[tuple[str, ...]] = asyncio.Queue()

    async def _on_change(endpoints: tuple[str, ...]) -> None:
        await changes.put(endpoints)

    watcher = EndpointWatcher(f"file:{path},localhost:9", _on_change, interval_s=0.02)
    await watcher.refresh()
    assert changes.get_nowait() == ("127.0.0.1:1", "127.0.0.1:9")
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.sleep(0.1)
        assert changes.empty()  # nothing changed: nothing reported
        _write(path, ["127.0.0.1:1", "127.0.0.1:2"])
        got = await asyncio.wait_for(changes.get(), 2)
        assert got == ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:9")
        watcher.set_targets(parse_targets("127.0.0.1:5"))
        assert await asyncio.wait_for(changes.get(), 2) == ("127.0.0.1:5",)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        EndpointWatcher("127.0.0.1:1", lambda e: None, interval_s=0)
