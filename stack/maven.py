"""Flattening a component's Java runtime classpath from Maven Central into the stack cache."""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from stack.apt import ensure_command
from stack.errors import InstallError
from stack.progress import Progress

_POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def pom_property(pom: Path, name: str) -> str:
    """Returns the value of `<properties><name>` in `pom`, where the component versions live."""
    node = ET.parse(pom).getroot().find(f"m:properties/m:{name}", _POM_NS)
    if node is None or not (node.text or "").strip():
        raise InstallError(f"{pom} has no <properties><{name}>")
    return (node.text or "").strip()


def copy_dependencies(pom: Path, lib_dir: Path, java_home: Path, progress: Progress, log_path: Path) -> None:
    """Resolves the runtime dependencies of `pom` and copies their jars into `lib_dir` (atomically).

    Maven keeps its downloads in ~/.m2 as usual; `lib_dir` appears only when every jar is there.
    """
    mvn = ensure_command("mvn", ["maven"], progress, log_path)
    staging = lib_dir.with_name(lib_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    # Maven runs on a copy of the pom in the cache, so nothing (a target/ folder) lands in the checkout.
    work_dir = lib_dir.with_name(lib_dir.name + ".maven")
    work_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(pom, work_dir / "pom.xml")
    progress.run(
        [
            mvn,
            "--batch-mode",
            "--no-transfer-progress",
            "--file",
            str(work_dir / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ],
        log_path=log_path,
        env={**os.environ, "JAVA_HOME": str(java_home)},
        cwd=work_dir,
    )
    jars = list(staging.glob("*.jar"))
    if not jars:
        raise InstallError(f"Maven copied no jars for {pom} (see {log_path})")
    shutil.rmtree(lib_dir, ignore_errors=True)
    staging.rename(lib_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    progress.say(f"  {len(jars)} jars in {lib_dir}")
