"""Secrets in the manifests: none is written in them, and the ones mounted as files only their pod may read.

Every overlay is rendered (kustomize) and walked: no Secret object carries data, no variable or ConfigMap
key that names a password, token or secret holds a literal value, no URL carries a password; the Secret
volumes that feed a `<VAR>_FILE` secret (libs/config.py refuses a file others may read) have a
`defaultMode` without the others' bits and the pod an `fsGroup`, so its user can read them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy.k8s_objects import (
    PYTHON_SERVICES,
    WORKERS,
    Rendered,
    container_env,
    loaded_config,
    mounts,
)

# A name that says its value is a credential; `..._FILE` names a file instead.
_SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY)(?!.*_FILE$)", re.IGNORECASE)
# scheme://user:password@host
_URL_WITH_PASSWORD = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*:[^@/\s]+@")


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string in an object with its path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}[{index}]")
    elif isinstance(value, str):
        yield where, value


def _label(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def test_no_manifest_carries_a_literal_secret(rendered: Rendered) -> None:
    found: list[str] = []
    for obj in rendered.objects:
        if obj["kind"] == "Secret" and (obj.get("data") or obj.get("stringData")):
            found.append(f"{_label(obj)}: a Secret with data in the manifests")
        if obj["kind"] == "ConfigMap":
            found += [f"{_label(obj)}: key {key}" for key in obj.get("data", {}) if _SECRET_NAME.search(key)]
        for where, text in _strings(obj, _label(obj)):
            if _URL_WITH_PASSWORD.search(text):
                found.append(f"{where}: a URL with a password")
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            for item in container.get("env", []):
                if _SECRET_NAME.search(item["name"]) and "value" in item:
                    found.append(f"{_label(obj)}: {item['name']} has a literal value")
    assert found == []


@pytest.mark.parametrize("name", (*PYTHON_SERVICES, *WORKERS))
def test_secret_files_are_mounted_readable_by_the_pod_only(rendered: Rendered, name: str) -> None:
    _, _, files = loaded_config(rendered, name)
    workload = rendered.workload(name)
    volumes = mounts(workload)
    pod = workload["spec"]["template"]["spec"]
    for variable, path in files.items():
        holder = [v for mount, v in volumes.items() if path.startswith(mount.rstrip("/") + "/")]
        assert holder and "secret" in holder[0], f"{name}: {variable}={path} is not in a mounted Secret"
        mode = holder[0]["secret"].get("defaultMode", 0o644)
        assert mode & 0o007 == 0, (
            f"{name}: {variable}'s Secret has defaultMode {mode:04o} (others may read it)"
        )
        assert pod.get("securityContext", {}).get("fsGroup"), f"{name}: no fsGroup to read {variable}'s file"
    # The variables that name a credential are files, never values (container_env shows Secret refs as <..>).
    env = container_env(rendered, workload)
    literal = [k for k, v in env.items() if _SECRET_NAME.search(k) and not v.startswith("<")]
    assert literal == [], f"{name}: credentials as values {literal}"
