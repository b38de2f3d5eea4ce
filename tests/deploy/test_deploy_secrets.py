"""Secrets in the manifests: none is written in them, and the ones mounted as files only their pod may read.

Every overlay is rendered (kustomize) and walked: no Secret object carries data, no variable or ConfigMap
key that names a password, token or secret holds a literal value, no URL carries a password; the Secret
volumes that feed a `<VAR>_FILE` secret (libs/config.py refuses a file others may read) have a
`defaultMode` without the others' bits and the pod an `fsGroup`, so its user can read them. Kafka: every
listener authenticates (SCRAM), nothing is allowed without an ACL, and each client logs in as its own
KafkaUser (password from that user's Secret) whose ACLs are exactly its configured topics and group.
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


# Kafka: SCRAM logins and per-service ACLs (base/data/kafka.yaml, kafka-users.yaml).
_KAFKA_CLIENTS = ("gateway", "logging", "features-ingest")


def _wanted_acls(name: str, config: Any) -> dict[tuple[str, str], set[str]]:
    """What the service's own settings say it touches: its topics and group, with the operations it needs."""
    if name == "gateway":
        return {("topic", config.inference_log.inference_log_topic): {"Write", "Describe"}}
    if name == "logging":
        p = config.pipeline
        return {
            ("topic", p.topic): {"Read", "Describe"},
            ("group", p.consumer_group): {"Read"},
            ("topic", p.dead_letter_topic): {"Write", "Describe"},
        }
    s = config.stream
    return {
        ("topic", s.stream_topic): {"Read", "Describe"},
        ("group", s.stream_group_id): {"Read"},
        ("topic", s.stream_dead_letter_topic): {"Write", "Describe"},
    }


def test_kafka_authenticates_every_client_and_allows_nothing_without_an_acl(rendered: Rendered) -> None:
    spec = rendered.get("Kafka", "infergrid")["spec"]["kafka"]
    assert [listener.get("authentication", {}).get("type") for listener in spec["listeners"]] == [
        "scram-sha-512"
    ]
    assert spec["authorization"]["type"] == "simple"
    assert spec["authorization"]["superUsers"] == ["infergrid-kafka-admin"]
    assert spec["config"].get("allow.everyone.if.no.acl.found", False) is False
    users = {u["metadata"]["name"]: u["spec"] for u in rendered.of_kind("KafkaUser")}
    assert all(u["authentication"]["type"] == "scram-sha-512" for u in users.values())
    # Only the operator's user has no ACLs (it is a super user).
    assert [n for n, u in users.items() if "authorization" not in u] == ["infergrid-kafka-admin"]


@pytest.mark.parametrize("name", _KAFKA_CLIENTS)
def test_each_kafka_client_logs_in_as_its_own_user_limited_to_its_topics(
    rendered: Rendered, name: str
) -> None:
    from stack.kafka import SERVICE_ACLS

    config, _, files = loaded_config(rendered, name)
    kafka = config.kafka
    assert (kafka.kafka_security_protocol, kafka.kafka_sasl_mechanism) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")
    user = kafka.kafka_sasl_username
    password = [path for variable, path in files.items() if variable.endswith("_KAFKA_SASL_PASSWORD_FILE")]
    assert len(password) == 1, f"{name}: no Kafka password file"
    # The file comes from the Secret the User Operator writes for this very user.
    (holder,) = [
        v for m, v in mounts(rendered.workload(name)).items() if password[0].startswith(m.rstrip("/") + "/")
    ]
    assert holder["secret"]["secretName"] == user
    users = {u["metadata"]["name"]: u["spec"] for u in rendered.of_kind("KafkaUser")}
    acls: dict[tuple[str, str], set[str]] = {}
    for acl in users[user]["authorization"]["acls"]:
        resource = acl["resource"]
        assert resource.get("patternType", "literal") == "literal", f"{user}: {resource}"
        acls.setdefault((resource["type"], resource["name"]), set()).update(acl["operations"])
    assert acls == _wanted_acls(name, config)
    topics = {t["spec"]["topicName"] for t in rendered.of_kind("KafkaTopic")}
    assert {n for kind, n in acls if kind == "topic"} <= topics
    # The local stack grants the same user the same topics and group (stack/kafka.py).
    local = SERVICE_ACLS["features" if name == "features-ingest" else name]
    assert {(kind, resource) for kind, resource, _ in local} == set(acls)
