"""Who may read the inference log: every InferenceLogService call presents a credential.

The credential travels as the gateway's API keys do (`x-api-key`, or `authorization: Bearer <credential>`):

- a tenant's API key, from the same hashed key file and platform tenants the gateway and the edge use
  (`libs.admission.AdmissionPolicy`): it reads its own tenant's records only. A read naming another tenant
  is PERMISSION_DENIED; a read naming none reads the key's tenant. GetStats (counts over every tenant) is
  PERMISSION_DENIED;
- the operator's admin token (`query_admin_token`, given as a `_FILE`): reads any tenant (the read must
  name it) and GetStats;
- nothing, an unknown key or a revoked one (gone from the key file): UNAUTHENTICATED.

Keys are found by their sha256 (the key file holds no keys); the admin token is compared by its sha256
with `hmac.compare_digest`, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

import grpc

from libs.admission import AdmissionPolicy
from libs.apikeys import CREDENTIAL_HEADERS, presented_key
from libs.errors import PermissionDenied, Unauthenticated


class QueryAccess:
    """Decides whose records a call may read (see the module docstring)."""

    def __init__(self, admin_token: str, policy: AdmissionPolicy | None) -> None:
        self._admin = hashlib.sha256(admin_token.encode()).digest() if admin_token else None
        self._policy = policy

    def caller(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's tenant, or None for the operator; raises Unauthenticated / PermissionDenied."""
        headers = {
            name: value
            for name, value in context.invocation_metadata() or ()
            if name in CREDENTIAL_HEADERS and isinstance(value, str)
        }
        credential = presented_key(headers)
        if not credential:
            raise Unauthenticated("missing credential: send x-api-key or authorization: Bearer <key>")
        digest = hashlib.sha256(credential.encode()).digest()
        if self._admin is not None and hmac.compare_digest(digest, self._admin):
            return None
        if self._policy is None:
            raise Unauthenticated("invalid API key")
        return self._policy.authenticate(headers).tenant

    def tenant(self, context: grpc.aio.ServicerContext, requested: str) -> str:
        """The tenant a read is for: the key's own (PermissionDenied when it names another), or any for the operator."""
        caller = self.caller(context)
        if caller is None or requested == caller:
            return requested
        if requested:
            raise PermissionDenied(f"tenant: this API key reads only the records of tenant {caller!r}")
        return caller

    def operator(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """Raises PermissionDenied unless the caller holds the admin token."""
        if self.caller(context) is not None:
            raise PermissionDenied(f"{what} needs the operator's admin token")
