"""The server's own 404 and 405 answer in its RFC 6749 §5.2 shape, as every other refusal does
(FastAPI's default was ``{"detail": "Not Found"}`` / ``{"detail": "Method Not Allowed"}``)."""

from __future__ import annotations

import httpx
import pytest

CASES: list[tuple[str, str, int, str, str | None]] = [
    ("GET", "/nope", 404, "not_found", None),
    ("POST", "/token/extra", 404, "not_found", None),
    ("GET", "/token", 405, "invalid_request", "POST"),
    ("GET", "/introspect", 405, "invalid_request", "POST"),
    ("PUT", "/revoke", 405, "invalid_request", "POST"),
    ("PUT", "/register", 405, "invalid_request", "POST"),
    ("DELETE", "/jwks", 405, "invalid_request", "GET, HEAD"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
async def test_an_unknown_path_or_method_is_an_oauth_error(
    http: httpx.AsyncClient, case: tuple[str, str, int, str, str | None]
) -> None:
    method, path, status, error, allow = case
    response = await http.request(method, path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["error"] == error, body
    assert set(body) == {"error", "error_description"}, body
    if allow is None:
        assert "allow" not in response.headers
        return
    sent = response.headers["allow"]  # Starlette joins a set: the order varies between processes
    assert set(sent.split(", ")) == set(allow.split(", ")), sent
    assert body["error_description"] == f"{method} is not allowed here: use {sent}"
