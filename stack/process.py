"""Server processes: spawning them detached, pid files, liveness, and stopping them (TERM, then KILL)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

# Set in the environment of every process the stack starts; its value is the state directory. It marks
# the processes as ours (children inherit it), so `down` can find strays without touching foreign ones.
MARKER_VARIABLE = "INFERGRID_STACK_STATE_DIR"
COMPONENT_VARIABLE = "INFERGRID_STACK_COMPONENT"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessRecord:
    """What a pid file holds about a started component process."""

    component: str
    pid: int
    start_ticks: int
    started_at: float
    command: list[str]
    ports: dict[str, int] = field(default_factory=dict)
    log: str = ""

    def write(self, path: Path) -> None:
        """Writes the record atomically to `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> ProcessRecord | None:
        """Reads a pid file; None when it is missing or unreadable."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def is_alive(self) -> bool:
        """True while the very process that was started runs (a reused pid does not count)."""
        return _start_ticks(self.pid) == self.start_ticks


def _ticks_of(process: psutil.Process) -> int | None:
    """The process start time in clock ticks since boot (/proc/<pid>/stat's starttime, which pid files
    hold); None when it is gone or a zombie."""
    try:
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        # psutil's create_time is boot time + starttime / ticks per second: back to the exact ticks.
        return round((process.create_time() - psutil.boot_time()) * _CLOCK_TICKS)
    except psutil.Error:
        return None


def _start_ticks(pid: int) -> int | None:
    try:
        return _ticks_of(psutil.Process(pid))
    except psutil.Error:
        return None


def spawn(
    component: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    marker: str,
    ports: Mapping[str, int],
) -> ProcessRecord:
    """Starts `command` in its own session with stdout and stderr appended to `log_path`.

    The process outlives the caller (the CLI exits after `up`); it carries the marker variables.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env, MARKER_VARIABLE: marker, COMPONENT_VARIABLE: component}
    with log_path.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {component}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ticks = _start_ticks(proc.pid)
    return ProcessRecord(
        component=component,
        pid=proc.pid,
        start_ticks=ticks if ticks is not None else -1,
        started_at=time.time(),
        command=list(command),
        ports=dict(ports),
        log=str(log_path),
    )


def _reap(pid: int) -> None:
    """Collects the exit status when the process is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(record: ProcessRecord, sig: signal.Signals) -> None:
    if not record.is_alive():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(record.pid) == record.pid:
            os.killpg(record.pid, sig)  # the whole session we started: helpers die with the server
        else:
            os.kill(record.pid, sig)


def wait_for_exit(record: ProcessRecord, timeout_s: float) -> bool:
    """Waits up to `timeout_s` for the process to exit; True when it did."""
    deadline = time.monotonic() + timeout_s
    while True:
        _reap(record.pid)
        if not record.is_alive():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def terminate(record: ProcessRecord, timeout_s: float) -> bool:
    """Sends TERM, waits up to `timeout_s`, then KILL. Returns True when TERM was enough."""
    _signal(record, signal.SIGTERM)
    if wait_for_exit(record, timeout_s):
        return True
    _signal(record, signal.SIGKILL)
    wait_for_exit(record, 10.0)
    return False


@dataclass(frozen=True)
class MarkedProcess:
    """A running process that carries the stack's marker for some state directory."""

    pid: int
    component: str
    start_ticks: int


def find_marked_processes(marker: str) -> Iterator[MarkedProcess]:
    """Yields the live processes started by the stack whose marker equals `marker` (a state dir)."""
    for process in psutil.process_iter():
        try:
            variables = process.environ()
        except psutil.Error:  # gone, or another user's
            continue
        if variables.get(MARKER_VARIABLE) != marker:
            continue
        ticks = _ticks_of(process)
        if ticks is None:
            continue
        yield MarkedProcess(
            pid=process.pid, component=variables.get(COMPONENT_VARIABLE, "?"), start_ticks=ticks
        )


def terminate_marked(process: MarkedProcess, timeout_s: float) -> None:
    """Stops a stray marked process (TERM, then KILL), checking it is still the same process."""
    record = ProcessRecord(
        component=process.component,
        pid=process.pid,
        start_ticks=process.start_ticks,
        started_at=0,
        command=[],
    )
    terminate(record, timeout_s)
