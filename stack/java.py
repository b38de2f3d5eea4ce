"""The OpenJDK 17 that Cassandra 5.0 and Kafka 4.x run on, found under /usr/lib/jvm or installed with apt."""

from __future__ import annotations

import re
from pathlib import Path

from stack.apt import install_packages
from stack.errors import InstallError
from stack.progress import Progress

JAVA_MAJOR = 17
JVM_ROOT = Path("/usr/lib/jvm")
JDK_PACKAGE = "openjdk-17-jre-headless"


def java_major_version(java_home: Path) -> int | None:
    """Reads the major version from `<java_home>/release`; None when it is not a JDK/JRE home."""
    try:
        text = (java_home / "release").read_text()
    except OSError:
        return None
    match = re.search(r'^JAVA_VERSION="(\d+)', text, re.MULTILINE)
    return int(match.group(1)) if match else None


def find_java_home(preferred: Path | None = None) -> Path | None:
    """Returns a Java 17 home: `preferred` when given, else the first one under /usr/lib/jvm.

    Cassandra 5.0 must not run on JDK 24 or newer (it calls System.setSecurityManager), so the machine's
    default `java` is never used blindly.

    Raises:
        InstallError: `preferred` is not a Java 17 home.
    """
    if preferred is not None:
        if java_major_version(preferred) != JAVA_MAJOR or not (preferred / "bin" / "java").exists():
            raise InstallError(f"INFERGRID_JAVA_HOME={preferred} is not a Java {JAVA_MAJOR} home")
        return preferred
    if not JVM_ROOT.is_dir():
        return None
    for home in sorted(JVM_ROOT.iterdir()):
        if home.is_symlink():
            continue
        if java_major_version(home) == JAVA_MAJOR and (home / "bin" / "java").exists():
            return home
    return None


def ensure_java_home(preferred: Path | None, progress: Progress, log_path: Path) -> Path:
    """Returns a Java 17 home, installing Debian's OpenJDK 17 first when there is none."""
    home = find_java_home(preferred)
    if home is None:
        progress.say(f"no Java {JAVA_MAJOR} under {JVM_ROOT}; installing {JDK_PACKAGE}")
        install_packages([JDK_PACKAGE], progress, log_path)
        home = find_java_home(preferred)
    if home is None:
        raise InstallError(f"installed {JDK_PACKAGE} but found no Java {JAVA_MAJOR} under {JVM_ROOT}")
    return home
