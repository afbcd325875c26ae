"""A receiver's requests to a transmitter (SSF 1.0 §7-8): the guarded JSON request and the
find-or-create of its stream. Used by the deployment's subscriber (push streams at partners,
:mod:`.subscriber`) and by the reference settlement service's poll receiver
(``trustplane.reference.receiver``). Every request goes through the guarded fetcher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from trustplane.outbound import OutboundError, OutboundFetcher


async def request_json(
    fetcher: OutboundFetcher,
    method: str,
    url: str,
    *,
    purpose: str,
    error: type[Exception],
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    data: dict[str, str] | None = None,
    max_bytes: int | None = None,
    expect: tuple[int, ...] = (200,),
) -> Any:
    """The JSON answer to one request, or ``error``: the fetcher refused or failed, the status is
    not in ``expect``, or the body is not JSON. A status in ``expect`` that is not 2xx answers
    None, its body unread (the caller acts on the status, e.g. a 401: a new token)."""
    try:
        answer = await fetcher.request(
            method,
            url,
            purpose=purpose,
            headers={"Accept": "application/json", **(headers or {})},
            content=content,
            data=data,
            max_bytes=max_bytes,
        )
    except OutboundError as exc:
        raise error(f"{url[:200]}: {exc.outcome}: {exc.reason}") from None
    if answer.status not in expect:
        raise error(f"{url[:200]}: HTTP {answer.status} {answer.body[:200]!r}")
    if not 200 <= answer.status < 300:
        return None
    try:
        return answer.json()
    except OutboundError:
        raise error(f"{url[:200]}: not JSON") from None


async def find_or_create_stream(
    fetcher: OutboundFetcher,
    endpoint: str,
    bearer: dict[str, str],
    *,
    matches: Callable[[dict[str, Any], dict[str, Any]], bool],
    body: dict[str, Any],
    purpose: str,
    error: type[Exception],
) -> Any:
    """The first of our streams at the configuration ``endpoint`` for which ``matches(stream,
    delivery)`` holds; if none does, the stream the transmitter creates from ``body`` (SSF 1.0
    §8.1.1). The answer is the transmitter's JSON, unchecked: the caller checks what it uses."""
    streams = await request_json(
        fetcher, "GET", endpoint, purpose=purpose, error=error, headers=bearer
    )
    for stream in streams if isinstance(streams, list) else []:
        delivery = stream.get("delivery") if isinstance(stream, dict) else None
        if isinstance(delivery, dict) and matches(stream, delivery):
            return stream
    return await request_json(
        fetcher,
        "POST",
        endpoint,
        purpose=purpose,
        error=error,
        headers={**bearer, "Content-Type": "application/json"},
        content=orjson.dumps(body),
        expect=(200, 201),
    )
