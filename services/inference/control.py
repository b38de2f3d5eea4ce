"""Who may change what the inference service serves (RepositoryModelLoad/Unload, on gRPC and HTTP).

The model control API loads files from the model repository and starts model instances: it is an
operator's tool, never a client's. It is off unless the service is started with
`INFERGRID_INFERENCE_CONTROL_ENABLED=true` (anyone who reaches the port may use it: a private network
only) or with an admin token file (`INFERGRID_INFERENCE_CONTROL_TOKEN_FILE`), in which case a call must
send `authorization: Bearer <token>` (compared in constant time). Envoy has no route to this service.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from libs.errors import PermissionDenied, Unauthenticated


class ControlGate:
    """Decides whether a model control call may proceed."""

    def __init__(self, *, enabled: bool = False, token: str = "") -> None:
        self._enabled = enabled
        self._token = token.encode()

    @property
    def open(self) -> bool:
        """True when the control API is reachable at all (enabled or token-protected)."""
        return self._enabled or bool(self._token)

    def check(self, headers: Mapping[str, str]) -> None:
        """Raises unless the call may change the served models.

        Raises:
            PermissionDenied: the control API is off.
            Unauthenticated: a token is required and the call did not send the right one.
        """
        if self._token:
            scheme, _, presented = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), self._token):
                raise Unauthenticated("model control: missing or invalid admin token (authorization: Bearer)")
            return
        if not self._enabled:
            raise PermissionDenied(
                "model control is disabled on this server (INFERGRID_INFERENCE_CONTROL_ENABLED or "
                "INFERGRID_INFERENCE_CONTROL_TOKEN_FILE turns it on)"
            )
