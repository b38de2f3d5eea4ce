"""Process supervision: pid records, the marker, TERM then KILL, and port holders."""

import socket
import sys
import time
from pathlib import Path

from stack.ports import find_free_ports, find_port_holder, is_port_free
from stack.process import ProcessRecord, find_marked_processes, spawn, terminate


def _spawn(tmp_path: Path, code: str) -> ProcessRecord:
    return spawn(
        "sleeper",
        [sys.executable, "-c", code],
        env={},
        cwd=tmp_path,
        log_path=tmp_path / "sleeper.log",
        marker=str(tmp_path),
        ports={},
    )


def test_spawned_process_is_marked_recorded_and_terminated(tmp_path: Path) -> None:
    record = _spawn(tmp_path, "import time; time.sleep(60)")
    try:
        assert record.is_alive()
        record.write(tmp_path / "sleeper.json")
        assert ProcessRecord.read(tmp_path / "sleeper.json") == record
        assert [p.pid for p in find_marked_processes(str(tmp_path))] == [record.pid]

        assert terminate(record, timeout_s=5) is True

        assert not record.is_alive()
        assert list(find_marked_processes(str(tmp_path))) == []
    finally:
        terminate(record, timeout_s=1)


def test_process_ignoring_term_is_killed(tmp_path: Path) -> None:
    record = _spawn(
        tmp_path,
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); time.sleep(60)",
    )
    deadline = time.monotonic() + 10
    while "ok" not in (tmp_path / "sleeper.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)

    assert terminate(record, timeout_s=0.5) is False  # TERM was not enough

    assert not record.is_alive()


def test_a_reused_pid_is_not_ours() -> None:
    record = ProcessRecord(component="x", pid=1, start_ticks=-5, started_at=0, command=[])
    assert not record.is_alive()


def test_port_holder_is_found() -> None:
    (port,) = find_free_ports("127.0.0.1", 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not is_port_free("127.0.0.1", port)
        holder = find_port_holder(port)
    assert holder.pid is not None
    assert "pid" in holder.describe()
    assert is_port_free("127.0.0.1", port)
