"""API keys, the key file, the model read from gRPC bodies, and the authorization decision."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from infergrid.gateway.v1 import gateway_pb2
from libs.apikeys import KeyFileError, add_key, hash_key, load_keys, parse_keys, presented_key
from libs.platform import parse_platform
from services.edge import keys as keys_cli
from services.edge.policy import Authorizer, read_grpc_body

PLATFORM = parse_platform(
    """
rate_limit_tiers: {free: {requests_per_second: 1, burst: 2}}
tenants:
  demo: {tier: free, models: [fraud]}
  all: {tier: free, models: ["*"]}
"""
)


def _frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _authorizer(*tenants_keys: tuple[str, str]) -> Authorizer:
    entries = {}
    for tenant, key in tenants_keys:
        entry = parse_keys(f"keys: [{{name: {tenant}, tenant: {tenant}, sha256: {hash_key(key)}}}]")
        entries.update(entry)
    return Authorizer(PLATFORM, entries)


PREDICT = "/infergrid.gateway.v1.PredictionService/Predict"


def test_key_is_read_from_x_api_key_or_bearer() -> None:
    assert presented_key({"x-api-key": " k1 "}) == "k1"
    assert presented_key({"authorization": "Bearer k2"}) == "k2"
    assert presented_key({"authorization": "bearer k3"}) == "k3"
    assert presented_key({"authorization": "Basic abc"}) == ""
    assert presented_key({}) == ""


def test_model_is_read_from_predict_and_batch_bodies() -> None:
    predict = gateway_pb2.PredictRequest(model="fraud", entities={"user_id": "u1"}).SerializeToString()
    batch = gateway_pb2.PredictBatchRequest(
        model="ranker", rows=[gateway_pb2.PredictRow()] * 3
    ).SerializeToString()

    assert read_grpc_body(_frame(predict)) == ("fraud", 0)
    assert read_grpc_body(_frame(batch)) == ("ranker", 3)
    assert read_grpc_body(_frame(b"")) == ("", 0)
    assert read_grpc_body(b"\x01" + _frame(predict)[1:]) is None  # compressed
    assert read_grpc_body(_frame(b"\x0a\xff")) is None  # truncated


def test_the_last_model_field_wins_as_in_protobuf() -> None:
    twice = gateway_pb2.PredictRequest(model="fraud").SerializeToString() + (
        gateway_pb2.PredictRequest(model="ranker").SerializeToString()
    )

    assert gateway_pb2.PredictRequest.FromString(twice).model == "ranker"
    assert read_grpc_body(_frame(twice)) == ("ranker", 0)


def test_decisions() -> None:
    auth = _authorizer(("demo", "secret-demo"), ("all", "secret-all"))
    body = _frame(gateway_pb2.PredictRequest(model="ranker").SerializeToString())

    missing = auth.decide({}, PREDICT, body)
    bad = auth.decide({"x-api-key": "nope"}, PREDICT, body)
    forbidden = auth.decide({"x-api-key": "secret-demo"}, PREDICT, body)
    allowed = auth.decide({"x-api-key": "secret-all"}, PREDICT, body)

    assert (missing.allowed, missing.http_status) == (False, 401)
    assert "missing API key" in missing.message
    assert (bad.allowed, bad.http_status, bad.message) == (False, 401, "invalid API key")
    assert (forbidden.allowed, forbidden.http_status) == (False, 403)
    assert "may not call model 'ranker'" in forbidden.message
    assert allowed.allowed
    assert allowed.upstream_headers == {
        "x-infergrid-tenant": "all",
        "x-infergrid-tier": "free",
        "x-infergrid-key-name": "all",
        "x-infergrid-model": "ranker",
    }


def test_inference_v2_paths_are_admitted_per_model() -> None:
    """The routed KServe v2 REST paths: the model comes from the path, the tenant's model list applies."""
    auth = _authorizer(("demo", "secret-demo"))
    key = {"x-api-key": "secret-demo"}
    for path in ("/v2/models/fraud/versions/1/infer", "/v1/models/fraud:predict"):
        assert auth.decide(key, path, b"").upstream_headers["x-infergrid-model"] == "fraud"
    infer = auth.decide(key, "/v2/models/fraud/infer", b'{"inputs": []}')
    assert infer.allowed and infer.upstream_headers["x-infergrid-model"] == "fraud" and infer.rows == 1
    other = auth.decide(key, "/v2/models/ranker/versions/2/infer", b"")
    assert (other.allowed, other.http_status) == (False, 403)
    assert auth.decide({}, "/v2/models/fraud/infer", b"").http_status == 401
    assert auth.decide({}, "/v2/health/ready", b"").http_status == 401
    health = auth.decide(key, "/v2/health/ready", b"")
    assert health.allowed and "x-infergrid-model" not in health.upstream_headers


def test_no_secret_in_any_message() -> None:
    auth = _authorizer(("demo", "secret-demo"))
    for key in ("secret-demo", "wrong-secret"):
        decision = auth.decide({"x-api-key": key}, PREDICT, _frame(b"\x0a\x06ranker"))
        assert key not in decision.message


def test_key_file_round_trip_stores_only_hashes(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    add_key(path, "demo", "demo", "k-one")
    add_key(path, "demo", "other", "k-two")
    add_key(path, "demo", "demo", "k-three")  # same name: rotated

    loaded = load_keys(path)
    text = path.read_text()

    assert {k.name for k in loaded.values()} == {"demo", "other"}
    assert hash_key("k-three") in loaded and hash_key("k-one") not in loaded
    assert "k-two" not in text and "k-three" not in text
    assert hashlib.sha256(b"k-two").hexdigest() in text
    assert path.stat().st_mode & 0o077 == 0


def test_bad_key_files_name_the_entry() -> None:
    with pytest.raises(KeyFileError, match=r"keys\[0\].tenant"):
        parse_keys("keys: [{name: a, sha256: " + "0" * 64 + "}]")
    with pytest.raises(KeyFileError, match=r"keys\[0\].sha256"):
        parse_keys("keys: [{name: a, tenant: t, sha256: xyz}]")


def test_cli_mints_a_key_once_or_takes_it_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    platform = tmp_path / "platform.yaml"
    platform.write_text("rate_limit_tiers: {free: {requests_per_second: 1}}\ntenants: {demo: {tier: free}}\n")

    add = ["--platform", str(platform), "add", "--tenant", "demo"]
    assert keys_cli.main([*add, "--name", "demo"]) == 0
    minted = capsys.readouterr().out.strip()
    monkeypatch.setenv("MY_KEY", "ig_from_env")
    assert keys_cli.main([*add, "--name", "ci", "--key-from-env", "MY_KEY"]) == 0
    from_env_out = capsys.readouterr().out

    stored = load_keys(tmp_path / "keys.yaml")
    assert minted.startswith("ig_") and hash_key(minted) in stored
    assert hash_key("ig_from_env") in stored
    assert "ig_from_env" not in from_env_out
    assert keys_cli.main(["--platform", str(platform), "remove", "--name", "ci"]) == 0
    assert hash_key("ig_from_env") not in load_keys(tmp_path / "keys.yaml")
