"""``bearer_guard.http.bearer_request``: what the guard is handed from the raw ASGI header list, as
Starlette's ``Headers`` would read it (the first ``Authorization`` value, the number of them)."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request

from trustplane.bearer_guard.guard import BearerRequest
from trustplane.bearer_guard.http import bearer_request


def request(headers: list[tuple[bytes, bytes]], query: bytes = b"") -> Request:
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    scope["query_string"] = query
    return Request(scope)


def starlette_reading(req: Request) -> tuple[str | None, int]:
    headers = Headers(scope=req.scope)
    return headers.get("authorization"), len(headers.getlist("authorization"))


def test_the_first_of_several_authorization_fields_and_their_count() -> None:
    req = request([(b"host", b"x"), (b"authorization", b"Bearer a"), (b"authorization", b"b")])
    assert bearer_request(req) == BearerRequest("Bearer a", 2, False)
    assert starlette_reading(req) == ("Bearer a", 2)


def test_no_authorization_field() -> None:
    req = request([(b"host", b"x")])
    assert bearer_request(req) == BearerRequest(None, 0, False)
    assert starlette_reading(req) == (None, 0)


def test_a_value_is_decoded_as_latin_1_and_a_query_token_is_seen() -> None:
    req = request([(b"authorization", b"Bearer \xe9")], query=b"access_token=t")
    assert bearer_request(req) == BearerRequest("Bearer \u00e9", 1, True)
    assert starlette_reading(req) == ("Bearer \u00e9", 1)
