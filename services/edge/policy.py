"""Envoy's ext_authz view of admission: reads the model (and the row count) from the request and asks
`libs.admission.AdmissionPolicy` — the same keys, tenants and model ACL the gateway applies in-process.

Envoy transcodes HTTP/JSON to gRPC before asking, so a request reaches this module as a gRPC call:
its path names the method, its body (a gRPC frame) carries the model in field 1 of both
PredictRequest and PredictBatchRequest (whose rows are field 3: one rate-limit unit each).
A plain `/v1/models/{model}:...` path is understood too, and the inference service's KServe v2 paths
(`/v2/models/{model}[/...]`, when the platform routes its REST API): the model is the path's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from libs.admission import (
    KEY_NAME_HEADER,
    MAX_MODEL_CHARS,
    MODEL_HEADER,
    TENANT_HEADER,
    TIER_HEADER,
    AdmissionPolicy,
)
from libs.apikeys import ApiKey
from libs.errors import PermissionDenied, Unauthenticated
from libs.platform import PlatformConfig
from libs.wire import length_delimited

_REST_PATH = re.compile(r"^/v1/models/(?P<model>[^/:?]+):|^/v2/models/(?P<v2model>[^/?]+)")
_BATCH_PATH = "/infergrid.gateway.v1.PredictionService/PredictBatch"
# The gRPC paths whose body names a model (the prediction methods).
_MODEL_PATHS = frozenset({"/infergrid.gateway.v1.PredictionService/Predict", _BATCH_PATH})


@dataclass(frozen=True)
class Decision:
    """The answer for one request: allowed (with headers for upstream) or denied with a status."""

    allowed: bool
    http_status: int = 200
    message: str = ""
    upstream_headers: Mapping[str, str] = field(default_factory=dict)
    # Rate-limit units of the request: its row count (1 for Predict).
    rows: int = 1


def _denied(status: int, message: str) -> Decision:
    return Decision(allowed=False, http_status=status, message=message)


def read_grpc_body(body: bytes) -> tuple[str, int] | None:
    """Field 1 (the model) and the count of field 3 (PredictBatch's rows) of the first gRPC message.

    Only the top-level fields are walked (length-delimited ones are skipped, not parsed). The *last*
    occurrence of the model wins, as it does for the gateway's protobuf parser: a message naming the
    model twice cannot be authorized for one model and served by another. None: unreadable.
    """
    if len(body) < 5 or body[0] != 0:  # compressed or not a gRPC frame
        return None
    length = int.from_bytes(body[1:5], "big")
    message = body[5 : 5 + length]
    if len(message) != length:
        return None
    model, rows = "", 0
    try:
        for number, start, end in length_delimited(message):
            if number == 1:
                model = message[start:end].decode()
            elif number == 3:
                rows += 1
    except (ValueError, UnicodeDecodeError):
        return None
    return model, rows  # model "" when absent: the gateway answers INVALID_ARGUMENT naming the field


@dataclass
class Authorizer:
    """Decides requests against the current platform config and key file (replaced when either changes)."""

    platform: PlatformConfig
    keys: Mapping[str, ApiKey]

    def decide(self, headers: Mapping[str, str], path: str, body: bytes) -> Decision:
        """Authenticates the key (401) and checks the tenant may call the model (403)."""
        policy = AdmissionPolicy(lambda: self.platform, self.keys)
        try:
            identity = policy.authenticate(headers)
        except (Unauthenticated, PermissionDenied) as exc:
            return _denied(401 if isinstance(exc, Unauthenticated) else 403, str(exc))
        upstream = {
            TENANT_HEADER: identity.tenant,
            TIER_HEADER: identity.tier,
            KEY_NAME_HEADER: identity.key_name,
        }
        path_only = path.split("?", 1)[0]
        rows = 1
        if path_only in _MODEL_PATHS or _REST_PATH.match(path_only):
            match = _REST_PATH.match(path_only)
            read = (match.group("model") or match.group("v2model"), 1) if match else read_grpc_body(body)
            if read is None:
                return _denied(
                    400, "cannot read the model from the request (compressed or malformed gRPC body)"
                )
            model, rows = read
            rows = max(1, rows) if path_only == _BATCH_PATH else 1
            if len(model) > MAX_MODEL_CHARS:
                return _denied(400, f"model: longer than {MAX_MODEL_CHARS} characters")
            if model:
                try:
                    policy.authorize(identity, model)
                except PermissionDenied as exc:
                    return _denied(403, str(exc))
                upstream[MODEL_HEADER] = model
        return Decision(allowed=True, upstream_headers=upstream, rows=rows)
