"""Who may call what: API key → tenant → allowed models, decided once per request for Envoy's ext_authz.

Envoy transcodes HTTP/JSON to gRPC before asking, so a request reaches this module as a gRPC call:
its path names the method, its body (a gRPC frame) carries the model in field 1 of both
PredictRequest and PredictBatchRequest. A plain `/v1/models/{model}:...` path is understood too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from libs.apikeys import ApiKey, hash_key, presented_key
from libs.platform import PlatformConfig

TENANT_HEADER = "x-infergrid-tenant"
TIER_HEADER = "x-infergrid-tier"
MODEL_HEADER = "x-infergrid-model"
KEY_NAME_HEADER = "x-infergrid-key-name"
_REST_PATH = re.compile(r"^/v1/models/(?P<model>[^/:?]+):")
_MAX_MODEL_CHARS = 256


@dataclass(frozen=True)
class Decision:
    """The answer for one request: allowed (with headers for upstream) or denied with a status."""

    allowed: bool
    http_status: int = 200
    message: str = ""
    upstream_headers: Mapping[str, str] = field(default_factory=dict)


def _denied(status: int, message: str) -> Decision:
    return Decision(allowed=False, http_status=status, message=message)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def model_from_grpc_body(body: bytes) -> str | None:
    """Field 1 (the model) of the first gRPC message in `body`; None when it cannot be read.

    Only the top-level fields are walked (length-delimited ones are skipped, not parsed). The *last*
    occurrence wins, as it does for the gateway's protobuf parser: a message naming the model twice
    cannot be authorized for one model and served by another.
    """
    if len(body) < 5 or body[0] != 0:  # compressed or not a gRPC frame
        return None
    length = int.from_bytes(body[1:5], "big")
    message = body[5 : 5 + length]
    if len(message) != length:
        return None
    model = ""
    pos = 0
    try:
        while pos < len(message):
            tag, pos = _varint(message, pos)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _varint(message, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(message, pos)
                if number == 1:
                    model = message[pos : pos + size].decode()
                pos += size
            else:
                return None
            if pos > len(message):
                return None
    except (ValueError, UnicodeDecodeError):
        return None
    return model  # "" when absent: the gateway answers INVALID_ARGUMENT naming the field


def requested_model(path: str, body: bytes) -> str | None:
    """The model a request is for: from a REST path, else from the gRPC body; None if unreadable."""
    match = _REST_PATH.match(path)
    if match:
        return match.group("model")
    return model_from_grpc_body(body)


@dataclass(frozen=True)
class Authorizer:
    """Decides requests against one version of the platform config and the key file."""

    platform: PlatformConfig
    keys: Mapping[str, ApiKey]
    # The gRPC paths whose body names a model (the prediction methods).
    model_paths: frozenset[str] = frozenset(
        {
            "/infergrid.gateway.v1.PredictionService/Predict",
            "/infergrid.gateway.v1.PredictionService/PredictBatch",
        }
    )

    def decide(self, headers: Mapping[str, str], path: str, body: bytes) -> Decision:
        """Authenticates the key (401) and checks the tenant may call the model (403)."""
        key = presented_key(headers)
        if not key:
            return _denied(401, "missing API key: send the x-api-key header or authorization: Bearer <key>")
        entry = self.keys.get(hash_key(key))
        if entry is None:
            return _denied(401, "invalid API key")
        tenant = self.platform.tenants.get(entry.tenant)
        if tenant is None:
            return _denied(403, f"tenant {entry.tenant!r} of this key is not configured")
        upstream = {TENANT_HEADER: entry.tenant, TIER_HEADER: tenant.tier, KEY_NAME_HEADER: entry.name}
        path_only = path.split("?", 1)[0]
        if path_only in self.model_paths or _REST_PATH.match(path_only):
            model = requested_model(path_only, body)
            if model is None:
                return _denied(
                    400, "cannot read the model from the request (compressed or malformed gRPC body)"
                )
            if len(model) > _MAX_MODEL_CHARS:
                return _denied(400, f"model: longer than {_MAX_MODEL_CHARS} characters")
            if model:
                if not tenant.may_call(model):
                    return _denied(403, f"tenant {entry.tenant!r} may not call model {model!r}")
                upstream[MODEL_HEADER] = model
        return Decision(allowed=True, upstream_headers=upstream)
