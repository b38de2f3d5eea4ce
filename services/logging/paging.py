"""Page tokens of QueryRecords: an opaque, versioned cursor bound to the query it came from."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from libs.errors import InvalidArgument

_VERSION = 1


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: an hour bucket and, within it, the last (time, request id) returned."""

    hour: int
    after_time_us: int | None = None
    after_request_id: str = ""


def query_fingerprint(model: str, model_version: str, start_us: int, end_us: int, tenant: str = "") -> str:
    """A short hash of the query parameters (tenant included); a token is only valid for the same query."""
    text = f"{model}\x00{model_version}\x00{start_us}\x00{end_us}"
    if tenant:
        text += f"\x00tenant={tenant}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_token(cursor: Cursor, fingerprint: str) -> str:
    """The opaque page token for `cursor` (URL-safe base64 of a small JSON object)."""
    body = {"v": _VERSION, "q": fingerprint, "h": cursor.hour}
    if cursor.after_time_us is not None:
        body["t"] = cursor.after_time_us
        body["r"] = cursor.after_request_id
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, fingerprint: str) -> Cursor:
    """The cursor in `token`.

    Raises:
        InvalidArgument: the token is malformed, from another version, or from a different query.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        if not isinstance(body, dict) or body.get("v") != _VERSION:
            raise ValueError("unknown version")
        hour, after_time, after_id = body["h"], body.get("t"), body.get("r", "")
        if not (isinstance(hour, int) and isinstance(after_id, str) and isinstance(after_time, int | None)):
            raise ValueError("bad field types")
    except (ValueError, KeyError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page_token: malformed; pass the next_page_token of a previous reply") from None
    if body.get("q") != fingerprint:
        raise InvalidArgument(
            "page_token: belongs to a query with different tenant, model, version or time range"
        )
    return Cursor(hour=hour, after_time_us=after_time, after_request_id=after_id)
