"""The one rule for request ids: the gateway applies it to what callers send, the log consumer to what it stores.

An id the gateway accepts is one the consumer stores: checking the same function in both places means no
answered request's record is dead-lettered for its id.
"""

from __future__ import annotations

import re

MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"^[\x21-\x7e]+$")


def request_id_problem(request_id: str) -> str:
    """What is wrong with a request id ("" when it is fine), as the text after `request_id: `."""
    if not request_id:
        return "empty"
    if len(request_id) > MAX_REQUEST_ID_CHARS or not _REQUEST_ID.match(request_id):
        return f"must be 1-{MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces"
    return ""
