"""Stack-wide operations behind the CLI: up, down, status, clean-state over a set of components."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from stack.component import Component, ComponentStatus
from stack.config import StackConfig
from stack.demo import how_to_call
from stack.process import ProcessRecord, find_marked_processes, terminate, terminate_marked
from stack.progress import Progress
from stack.registry import select, stages


def _together(group: Sequence[Component], action: str, out: TextIO) -> list[bool]:
    """Runs `start` or `stop` on every component of a group at once; re-raises the first failure."""
    if len(group) == 1:
        return [_act(group[0], action, out)]
    with ThreadPoolExecutor(len(group)) as pool:
        futures = [pool.submit(_act, component, action, out) for component in group]
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
    return [future.result() for future in futures]


def _act(component: Component, action: str, out: TextIO) -> bool:
    if action == "start":
        component.start(Progress(component.name, out))
        return True
    stopped = component.stop()
    if stopped:
        print(f"[stack] {component.name}: stopped", file=out, flush=True)
    return stopped


def up(config: StackConfig, names: Sequence[str], out: TextIO) -> list[Component]:
    """Installs what is missing and starts the named components (all when empty), in order.

    Components of one group (the cluster profile's Cassandra nodes, its Kafka brokers) start together. In
    the cluster profile the platform file is rendered first and the discovery files are refreshed after
    every step, so each replica finds the ones started before it.

    Raises:
        StackError: a component failed to install or start (those already started keep running).
    """
    started = time.monotonic()
    groups = stages(config, names)
    components = [component for group in groups for component in group]
    if config.is_cluster:
        from stack.cluster import after_group, prepare

        prepare(config)
    for group in groups:
        _together(group, "start", out)
        if config.is_cluster:
            after_group(config, group, out)
    print(f"\nstack up in {time.monotonic() - started:.1f} s; state and logs in {config.state_dir}", file=out)
    for component in components:
        for label, address in component.endpoints().items():
            print(f"  {component.name:<12} {label:<18} {address}", file=out)
    minted = next((str(getattr(c, "minted_key", "")) for c in components if getattr(c, "minted_key", "")), "")
    advice = how_to_call(config, components, minted)
    if advice:
        print(advice, file=out)
    return components


def down(config: StackConfig, names: Sequence[str], out: TextIO) -> None:
    """Stops the named components (all when empty) in reverse order, then any stray stack process.

    Strays are processes carrying this state directory's marker (see `stack.process`), e.g. servers
    whose pid file was deleted; with no names, every pid file in the state folder is honoured too.
    """
    groups = stages(config, names)
    components = [component for group in groups for component in group]
    if config.is_cluster:
        from stack.cluster import stop_order

        order = stop_order(groups)
    else:
        order = list(reversed(groups))
    for group in order:
        _together(group, "stop", out)
    wanted = {c.name for c in components}
    if not names and config.run_dir.is_dir():
        for pid_file in sorted(config.run_dir.glob("*.json")):
            record = ProcessRecord.read(pid_file)
            if record is not None and record.is_alive():
                terminate(record, 20.0)
                print(f"[stack] {record.component}: stopped", file=out)
            pid_file.unlink(missing_ok=True)
    for stray in find_marked_processes(str(config.state_dir)):
        if not names or stray.component in wanted:
            terminate_marked(stray, 20.0)
            print(f"[stack] {stray.component}: stopped stray process {stray.pid}", file=out)


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def status(config: StackConfig, names: Sequence[str]) -> list[ComponentStatus]:
    """The status of the named components (all when empty)."""
    return [component.status() for component in select(config, names)]


def format_status(rows: Sequence[ComponentStatus]) -> str:
    """One table: component, pid, port, health, uptime."""
    header = ("COMPONENT", "PID", "PORT", "HEALTH", "UPTIME")
    lines = [header] + [
        (
            row.name,
            str(row.pid) if row.pid else "-",
            ",".join(str(port) for port in row.ports.values()),
            row.health,
            _uptime(row.uptime_s),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def clean_state(config: StackConfig, names: Sequence[str], out: TextIO) -> None:
    """Stops the named components (all when empty) and deletes their data and logs.

    Other folders in the state directory (e.g. the test sessions' `test/`) are left alone.
    """
    down(config, names, out)
    for component in select(config, names):
        for path in (component.data_dir, config.log_dir / component.name):
            if path.exists():
                shutil.rmtree(path)
        component.log_path.unlink(missing_ok=True)
        print(f"[stack] {component.name}: state deleted", file=out)
    if config.is_cluster and not names:
        from stack.cluster import shared_state

        for path in shared_state(config):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        print("[stack] shared state deleted (discovery files, platform file, lake, models, keys)", file=out)
