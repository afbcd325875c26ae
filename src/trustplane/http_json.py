"""GET a bounded JSON object over HTTP: the one fetch behind the PEP's issuer metadata/JWKS and the
federation conformance checker's partner documents.

Any failure (transport error, non-200, larger than ``max_bytes``, not JSON, not an object) raises
:class:`JsonFetchError` whose message says why without the URL; each caller names the URL in its own
error type.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson


class JsonFetchError(Exception):
    """The document could not be fetched or is not a JSON object; the message says why."""


async def get_json_object(http: httpx.AsyncClient, url: str, *, max_bytes: int) -> dict[str, Any]:
    try:
        response = await http.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise JsonFetchError(f"{type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise JsonFetchError(f"answered HTTP {response.status_code}")
    if len(response.content) > max_bytes:
        raise JsonFetchError(f"larger than {max_bytes} bytes")
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise JsonFetchError("not JSON") from None
    if not isinstance(document, dict):
        raise JsonFetchError("not a JSON object")
    return document
