"""``application/x-www-form-urlencoded`` request bodies, parsed once with the RFC 6749 rules.

RFC 6749 §3.1/§3.2: parameters sent without a value are treated as omitted, and a parameter MUST NOT
be included more than once (``resource`` is the exception, RFC 8707 §2). Every name and value is text
PostgreSQL can store: an escape that is not UTF-8 (a lone surrogate's ``%ED%A0%80`` included) and a
NUL (``%00``) are ``invalid_request``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import unquote_plus

from starlette.datastructures import Headers

from trustplane.errors import InvalidRequestError
from trustplane.limits import RequestBodyTooLarge, read_body

MAX_BODY = 64 * 1024
MAX_FIELDS = 64
FORM_TYPE = "application/x-www-form-urlencoded"
REPEATABLE = frozenset({"resource", "audience"})


def _pairs(text: str) -> list[tuple[str, str]]:
    """``parse_qsl`` semantics (blank values dropped, at most ``MAX_FIELDS``), minus its cost on the
    common case: JWTs and URIs rarely need unquoting, so only fields with ``%`` or ``+`` are decoded,
    and an escape that is not UTF-8 is an error rather than a silent U+FFFD."""
    fields = text.split("&")
    if len(fields) > MAX_FIELDS:
        raise ValueError("too many fields")
    pairs = []
    for field in fields:
        name, _, value = field.partition("=")
        if value:
            pairs.append((_unquote(name), _unquote(value)))
    return pairs


def _unquote(text: str) -> str:
    if "%" not in text and "+" not in text:
        return text
    return _unquote_short(text) if len(text) <= _SHORT else unquote_plus(text, errors="strict")


#: Up to this length an escaped field is decoded once and remembered: what a client sends on every
#: request (``scope``, ``resource``, ``client_assertion_type``) repeats, and ``unquote_plus`` costs
#: a few microseconds per field. Bounded (LRU) so that varied input only costs the decode again.
_SHORT = 256


@functools.lru_cache(maxsize=1024)
def _unquote_short(text: str) -> str:
    return unquote_plus(text, errors="strict")


class _Request(Protocol):
    @property
    def headers(self) -> Headers: ...

    def stream(self) -> AsyncIterator[bytes]: ...


async def read_form(request: _Request) -> Form:
    """The one body reader of the form endpoints: the media type is checked before reading, and the
    read stops at the first chunk that crosses ``MAX_BODY`` (413, ``invalid_request``). The ASGI
    entry (:mod:`trustplane.limits`) has already refused a larger ``Content-Length``; this bound holds
    wherever the handler is mounted."""
    content_type = request.headers.get("content-type")
    if content_type is None or content_type.split(";", 1)[0].strip().lower() != FORM_TYPE:
        raise InvalidRequestError(f"the request body must be {FORM_TYPE}")
    return Form.parse(await read_body(request, MAX_BODY), content_type)


class Form:
    __slots__ = ("_multi", "_single")

    def __init__(self, single: dict[str, str], multi: dict[str, list[str]]) -> None:
        self._single, self._multi = single, multi

    @classmethod
    def parse(cls, body: bytes, content_type: str | None) -> Form:
        if content_type is None or content_type.split(";", 1)[0].strip().lower() != FORM_TYPE:
            raise InvalidRequestError(f"the request body must be {FORM_TYPE}")
        if len(body) > MAX_BODY:
            raise RequestBodyTooLarge(f"the request body is larger than {MAX_BODY} bytes")
        try:
            text = body.decode("utf-8")
            pairs = _pairs(text)
        except (UnicodeDecodeError, ValueError):
            raise InvalidRequestError("the request body is not valid form encoding") from None
        if "%00" in text or "\x00" in text:
            # PostgreSQL's text cannot hold it: refused here, not as a 500 from the store
            raise InvalidRequestError("a parameter holds a NUL character")
        single: dict[str, str] = {}
        multi: dict[str, list[str]] = {}
        for name, value in pairs:
            if name in REPEATABLE:
                multi.setdefault(name, []).append(value)
            elif name in single:
                raise InvalidRequestError(f"parameter {name!r} is repeated")
            else:
                single[name] = value
        return cls(single, multi)

    def get(self, name: str) -> str | None:
        return self._single.get(name)

    def supply(self, name: str, value: str) -> None:
        """Set a parameter the request did not send (a ``/par`` check recording what the request
        proved, e.g. the ``dpop_jkt`` of its DPoP proof); one it sent is never overwritten."""
        if name in self._single or name in self._multi:
            raise ValueError(f"parameter {name!r} is already present")
        self._single[name] = value

    def require(self, name: str) -> str:
        value = self._single.get(name)
        if value is None:
            raise InvalidRequestError(f"parameter {name!r} is required")
        return value

    def get_all(self, name: str) -> list[str]:
        return self._multi.get(name, [])

    def __contains__(self, name: str) -> bool:
        return name in self._single or name in self._multi
