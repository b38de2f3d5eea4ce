"""Progress reports for long installs: the step being done (N of M) and a heartbeat while it runs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from stack.errors import InstallError
from stack.logs import tail_lines

HEARTBEAT_S = 20.0


class Progress:
    """Prints `[stack] <component>: step N/M <what>` lines and runs install commands with a heartbeat."""

    def __init__(self, component: str, stream: TextIO | None = None) -> None:
        self._component = component
        self._stream = stream if stream is not None else sys.stderr

    def say(self, message: str) -> None:
        """Prints one line about the component."""
        print(f"[stack] {self._component}: {message}", file=self._stream, flush=True)

    def step(self, number: int, total: int, what: str) -> None:
        """Announces install step `number` of `total`."""
        self.say(f"step {number}/{total}: {what}")

    def run(
        self,
        command: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Runs an install command, its output appended to `log_path`, printing the elapsed time now and then.

        Raises:
            InstallError: the command failed; the message holds the end of its output.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            next_beat = started + HEARTBEAT_S
            while proc.poll() is None:
                time.sleep(0.5)
                if time.monotonic() >= next_beat:
                    self.say(f"  ... still running, {time.monotonic() - started:.0f} s (log: {log_path})")
                    next_beat += HEARTBEAT_S
        if proc.returncode != 0:
            tail = tail_lines(log_path, 30)
            raise InstallError(
                f"{self._component}: `{' '.join(command)}` failed with exit code {proc.returncode}; "
                f"last lines of {log_path}:\n{tail}"
            )
        self.say(f"  done in {time.monotonic() - started:.1f} s")
