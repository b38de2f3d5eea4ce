"""The OpenJDK 17 that Cassandra 5.0 and Kafka 4.x run on, found under /usr/lib/jvm or installed with apt, and
`JavaNode`, the base of those two servers (their jars copied by Maven into the cache)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from stack.apt import install_packages
from stack.component import NodeComponent
from stack.errors import InstallError
from stack.maven import copy_dependencies, pom_property
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


class JavaNode(NodeComponent):
    """A JVM server node whose jars Maven copies from `deploy/local/<kind>/pom.xml` (its `<kind>.version`)
    into the cache, run with the heap `heap` alone and `cluster_heap` as a node of several."""

    # The main Maven artifact, named in the install's progress line.
    artifact = ""
    heap = ("256M", "512M")
    cluster_heap: tuple[str, str] | None = None

    @property
    def _pom(self) -> Path:
        return self.config.deploy_dir / self.kind / "pom.xml"

    @property
    def version(self) -> str:
        """The server's version, from its pom.xml."""
        return pom_property(self._pom, f"{self.kind}.version")

    @property
    def lib_dir(self) -> Path:
        """The flattened runtime classpath in the cache."""
        return self.config.cache_dir / f"{self.kind}-{self.version}" / "lib"

    def install(self, progress: Progress) -> None:
        """Finds (or installs) OpenJDK 17, then copies the server's jars from Maven Central into the cache."""
        if self.lib_dir.is_dir() and find_java_home(self.config.java_home) is not None:
            return
        progress.step(1, 2, f"finding OpenJDK {JAVA_MAJOR}")
        java_home = ensure_java_home(self.config.java_home, progress, self.install_log_path)
        if not self.lib_dir.is_dir():
            progress.step(2, 2, f"fetching {self.artifact} {self.version} and its jars from Maven Central")
            copy_dependencies(self._pom, self.lib_dir, java_home, progress, self.install_log_path)

    def java(self, options: Sequence[str], *args: str) -> list[str]:
        """`java` with the node's heap, the JVM's `options`, the classpath, then `args` (the main class...)."""
        java_home = find_java_home(self.config.java_home)
        if java_home is None:
            raise InstallError(
                f"no Java {JAVA_MAJOR} found; run `python -m stack up {self.kind}` to install it"
            )
        heap = self.cluster_heap if self.nodes > 1 and self.cluster_heap else self.heap
        return [
            str(java_home / "bin" / "java"),
            f"-Xms{heap[0]}",
            f"-Xmx{heap[1]}",
            *options,
            "-cp",
            f"{self.lib_dir}/*",
            *args,
        ]
