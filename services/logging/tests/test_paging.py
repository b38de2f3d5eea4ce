"""Page tokens: round trip, binding to their query, refusal of malformed ones."""

from __future__ import annotations

import base64
import json

import pytest

from libs.errors import InvalidArgument
from services.logging.paging import Cursor, decode_token, encode_token, query_fingerprint

FINGERPRINT = query_fingerprint("fraud", "", 0, 10)


@pytest.mark.parametrize("cursor", [Cursor(5), Cursor(5, 123, "req-1"), Cursor(0, 0, "")])
def test_round_trip(cursor: Cursor) -> None:
    assert decode_token(encode_token(cursor, FINGERPRINT), FINGERPRINT) == cursor


def test_a_token_is_bound_to_its_query() -> None:
    token = encode_token(Cursor(5), FINGERPRINT)
    with pytest.raises(InvalidArgument, match="different"):
        decode_token(token, query_fingerprint("fraud", "2", 0, 10))


@pytest.mark.parametrize(
    "token",
    [
        "%%%",
        "bm90IGpzb24",  # "not json"
        base64.urlsafe_b64encode(json.dumps({"v": 99, "q": FINGERPRINT, "h": 1}).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps({"v": 1, "q": FINGERPRINT, "h": "x"}).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps([1, 2]).encode()).decode(),
    ],
)
def test_malformed_tokens_are_invalid_arguments(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        decode_token(token, FINGERPRINT)
