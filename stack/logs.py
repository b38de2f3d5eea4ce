"""Reading the components' log files: the last lines, or following them as they grow."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path


def tail_lines(path: Path, lines: int) -> str:
    """Returns the last `lines` lines of `path` ('' when it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def follow(paths: Sequence[Path], poll_s: float = 0.5) -> None:
    """Prints what is appended to `paths`, each line prefixed with its file's name, until interrupted."""
    offsets = {path: path.stat().st_size if path.exists() else 0 for path in paths}
    while True:
        for path in paths:
            try:
                with path.open("rb") as handle:
                    handle.seek(offsets[path])
                    chunk = handle.read()
            except OSError:
                continue
            if not chunk:
                continue
            offsets[path] += len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                sys.stdout.write(f"{path.stem:>10} | {line}\n")
            sys.stdout.flush()
        time.sleep(poll_s)
