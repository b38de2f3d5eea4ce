"""Debian packages installed on first use (redis-server, OpenJDK 17, Maven) when a command is missing."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from stack.errors import InstallError
from stack.progress import Progress

_POLICY_RC = Path("/usr/sbin/policy-rc.d")
_LISTS = Path("/var/lib/apt/lists")


def _lists_are_fresh() -> bool:
    try:
        newest = max(p.stat().st_mtime for p in _LISTS.iterdir() if "_Packages" in p.name)
    except (OSError, ValueError):
        return False
    return time.time() - newest < 7 * 24 * 3600


def install_packages(packages: Sequence[str], progress: Progress, log_path: Path) -> None:
    """Installs Debian `packages` with apt-get (running `apt-get update` first when the lists are stale).

    Package scripts are told not to start services (policy-rc.d): the Debian redis-server package would
    otherwise start a system Redis on port 6379, which the stack would then find in its way.

    Raises:
        InstallError: not root, or apt-get failed.
    """
    if os.geteuid() != 0:
        raise InstallError(f"missing Debian packages; run: sudo apt-get install -y {' '.join(packages)}")
    if shutil.which("apt-get") is None:
        raise InstallError(f"no apt-get on this machine; install {' '.join(packages)} by hand")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    added_policy = False
    if not _POLICY_RC.exists():
        _POLICY_RC.write_text(
            "#!/bin/sh\n# Written by the InferGrid stack during apt-get install.\nexit 101\n"
        )
        _POLICY_RC.chmod(0o755)
        added_policy = True
    try:
        if not _lists_are_fresh():
            progress.say("apt-get update")
            progress.run(["apt-get", "update", "-q"], log_path=log_path, env=env)
        progress.say(f"apt-get install {' '.join(packages)}")
        progress.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            log_path=log_path,
            env=env,
        )
    finally:
        if added_policy:
            _POLICY_RC.unlink(missing_ok=True)


def ensure_command(command: str, packages: Sequence[str], progress: Progress, log_path: Path) -> str:
    """Returns the path of `command`, installing `packages` first when it is not on PATH."""
    found = shutil.which(command)
    if found is None:
        install_packages(packages, progress, log_path)
        found = shutil.which(command)
    if found is None:
        raise InstallError(f"installed {' '.join(packages)} but `{command}` is still not on PATH")
    return found
