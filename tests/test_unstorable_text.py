"""Every string a caller sends that can reach PostgreSQL, in every endpoint of ``trustplane serve``,
refused with a 4xx in the endpoint's own error shape when PostgreSQL cannot hold it or its column and
index cannot: a NUL (``text`` refuses it), a lone surrogate (UTF-8 cannot encode it; invalid UTF-8 in
a percent-encoded form), an over-long string. Never a 500, and nothing written.

One table: each row is an endpoint and one of its string inputs, ``@`` marking where the string goes
(a form field, a JSON member, a path or query parameter, a header). Real HTTP against the app on
PostgreSQL (a NUL once answered 500 there and lost the valid work of the same request). The audit
ledger is left out of "nothing written": a refusal is audited on purpose.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import pytest_asyncio
from sqlalchemy import func, select

from tests.conftest import LEI
from tests.federation.partners import Partner
from tests.protocol_server import Server, running_server
from trustplane.protocol.scopes import internal_audience
from trustplane.protocol.tokens import issue_access_token
from trustplane.schema import metadata

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres]

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
#: Longer than the short columns (``varchar(64)``, ``varchar(128)``) yet within most of the
#: endpoints' own caps; longer than any column and B-tree index entry (PostgreSQL: at most ~2,700
#: bytes) yet within every body cap (64 KiB).
LONGER, LONGEST = 200, 8_000


@dataclass(frozen=True)
class Input:
    """How one bad string is written in each place a string goes."""

    name: str
    form: str  # in a form body, a query string or a path (percent-encoded)
    json: str  # inside a JSON string literal
    header: bytes
    code_known: bool  # the refusal's code is the body-text one (400 invalid_request), not any 4xx


INPUTS = [
    Input("nul", "a%00b", "a\\u0000b", b"a\x00b", True),
    Input("surrogate", "a%ED%A0%80b", "a\\ud800b", b"a\xed\xa0\x80b", False),
    *(Input(f"long-{n}", "x" * n, "x" * n, b"x" * n, False) for n in (LONGER, LONGEST)),
]
#: Where the string goes for which the body-text check answers (the rest: the target or header).
BODY_KINDS = ("form", "json")


@dataclass(frozen=True)
class Endpoint:
    """``target``: path and query (``@`` in it, or in ``body``, or the value of ``header``);
    ``api``/``scope``: the bearer token's audience path and scope (none: no token; ``register``: an
    initial access token); ``error``: the code a NUL in the body is answered with."""

    method: str
    target: str
    body: str | None = None
    kind: str = JSON
    api: str | None = None
    scope: str = ""
    header: str | None = None
    error: str = "invalid_request"
    #: the browser endpoints answer what they cannot redirect as an HTML page (RFC 6749 §4.1.2.1)
    page: bool = False


def row(name: str, endpoint: Endpoint) -> Any:
    return pytest.param(endpoint, id=name)


MANDATE = "mdt_@"
YAML = "application/yaml"


def profile(partner_id: str) -> str:
    """A trust profile the federation API takes, its ``name`` the string under test."""
    partner = Partner(partner_id, f"https://{partner_id}.example", "http://127.0.0.1:8000")
    return orjson.dumps(partner.profile(name="@")).decode()


STREAM_BODY = '{"stream_id": "@", "description": "x"}'
ENDPOINTS = [
    # ---- OAuth protocol endpoints (forms)
    row("token-scope", Endpoint("POST", "/token", "grant_type=client_credentials&scope=@", FORM)),
    row(
        "token-client_id",
        Endpoint("POST", "/token", "grant_type=client_credentials&client_id=@", FORM),
    ),
    row(
        "token-resource",
        Endpoint("POST", "/token", "grant_type=client_credentials&resource=@", FORM),
    ),
    row(
        "token-dpop",
        Endpoint("POST", "/token", "grant_type=client_credentials", FORM, header="DPoP"),
    ),
    row("introspect-token", Endpoint("POST", "/introspect", "token=@", FORM)),
    row("revoke-token", Endpoint("POST", "/revoke", "token=@&token_type_hint=access_token", FORM)),
    row("par-state", Endpoint("POST", "/par", "response_type=code&client_id=x&state=@", FORM)),
    row("authorize-query", Endpoint("GET", "/authorize?response_type=code&client_id=@", page=True)),
    row(
        "authorize-form",
        Endpoint("POST", "/authorize", "response_type=code&client_id=@", FORM, page=True),
    ),
    row("authorize-continue", Endpoint("GET", "/authorize/continue?request=@", page=True)),
    row(
        "authorize-login",
        Endpoint("POST", "/authorize/login", "request=@&username=u", FORM, page=True),
    ),
    row(
        "authorize-consent",
        Endpoint("POST", "/authorize/consent", "request=@&decision=allow", FORM, page=True),
    ),
    # ---- registration (RFC 7591/7592)
    row(
        "register-name",
        Endpoint(
            "POST",
            "/register",
            '{"client_name": "@"}',
            api="register",
            error="invalid_client_metadata",
        ),
    ),
    row(
        "register-key",
        Endpoint("POST", "/register", '{"@": 1}', api="register", error="invalid_client_metadata"),
    ),
    row("register-read", Endpoint("GET", "/register/@")),
    row("register-update", Endpoint("PUT", "/register/@", '{"client_id": "x"}')),
    row("register-delete", Endpoint("DELETE", "/register/@")),
    # ---- AuthZEN and policy simulations
    row(
        "evaluation-subject",
        Endpoint(
            "POST",
            "/access/v1/evaluation",
            '{"subject": {"type": "client", "id": "@"}, "action": {"name": "order:create"},'
            ' "resource": {"type": "order", "id": "1"}}',
            api="/access/v1",
            scope="decision:evaluate",
        ),
    ),
    row(
        "evaluation-request-id",
        Endpoint(
            "POST",
            "/access/v1/evaluation",
            '{"subject": {"type": "client", "id": "c"}, "action": {"name": "order:create"},'
            ' "resource": {"type": "order", "id": "1"}}',
            api="/access/v1",
            scope="decision:evaluate",
            header="X-Request-ID",
        ),
    ),
    row(
        "evaluation-correlation_id",
        Endpoint(
            "POST",
            "/access/v1/evaluation",
            '{"subject": {"type": "client", "id": "c"}, "action": {"name": "order:create"},'
            ' "resource": {"type": "order", "id": "1"}, "correlation_id": "@"}',
            api="/access/v1",
            scope="decision:evaluate",
        ),
    ),
    row(
        "evaluations-action",
        Endpoint(
            "POST",
            "/access/v1/evaluations",
            '{"subject": {"type": "client", "id": "c"}, "resource": {"type": "order", "id": "1"},'
            ' "evaluations": [{"action": {"name": "@"}}]}',
            api="/access/v1",
            scope="decision:evaluate",
        ),
    ),
    row(
        "simulations-name",
        Endpoint(
            "POST",
            "/access/v1/simulations",
            '{"name": "@"}',
            api="/access/v1",
            scope="policy:simulate",
        ),
    ),
    # ---- mandates
    row(
        "mandates-list",
        Endpoint("GET", "/mandates?grantor=@", api="/mandates", scope="mandate:view"),
    ),
    row(
        "mandates-show",
        Endpoint("GET", "/mandates/" + MANDATE, api="/mandates", scope="mandate:view"),
    ),
    row(
        "mandates-history",
        Endpoint("GET", f"/mandates/{MANDATE}/history", api="/mandates", scope="mandate:view"),
    ),
    row(
        "mandates-create",
        Endpoint(
            "POST",
            "/mandates",
            '{"grantor": "@", "grantee": "x"}',
            api="/mandates",
            scope="mandate:administer",
        ),
    ),
    row(
        "mandates-accept",
        Endpoint(
            "POST", f"/mandates/{MANDATE}/accept", "{}", api="/mandates", scope="mandate:administer"
        ),
    ),
    row(
        "mandates-revoke",
        Endpoint(
            "POST",
            "/mandates/mdt_1/revoke",
            '{"reason": "@"}',
            api="/mandates",
            scope="mandate:administer",
        ),
    ),
    # ---- federation
    row(
        "partners-add",
        Endpoint(
            "POST",
            "/federation/partners",
            '{"partner_id": "@"}',
            api="/federation",
            scope="partner:administer",
            error="invalid_trust_profile",
        ),
    ),
    row(
        "partners-add-name",
        Endpoint(
            "POST",
            "/federation/partners",
            profile("p-json"),
            api="/federation",
            scope="partner:administer",
            error="invalid_trust_profile",
        ),
    ),
    row(
        "partners-add-yaml-name",
        Endpoint(
            "POST",
            "/federation/partners",
            profile("p-yaml"),
            YAML,
            api="/federation",
            scope="partner:administer",
            error="invalid_trust_profile",
        ),
    ),
    row(
        "partners-show",
        Endpoint("GET", "/federation/partners/@", api="/federation", scope="partner:administer"),
    ),
    row(
        "partners-versions",
        Endpoint(
            "GET", "/federation/partners/@/versions", api="/federation", scope="partner:administer"
        ),
    ),
    row(
        "partners-update",
        Endpoint(
            "PUT",
            "/federation/partners/@",
            '{"partner_id": "x"}',
            api="/federation",
            scope="partner:administer",
        ),
    ),
    row(
        "partners-disable",
        Endpoint(
            "POST",
            "/federation/partners/p1/disable?reason=@",
            api="/federation",
            scope="partner:administer",
        ),
    ),
    # ---- audit
    row(
        "audit-entries",
        Endpoint("GET", "/audit/entries?subject=@", api="/audit", scope="audit:query"),
    ),
    row(
        "audit-transaction",
        Endpoint("GET", "/audit/transactions/@", api="/audit", scope="audit:query"),
    ),
    row(
        "audit-events",
        Endpoint("GET", "/audit/events?client_id=@", api="/audit", scope="audit:query"),
    ),
    row(
        "audit-inclusion",
        Endpoint("GET", "/audit/proof/inclusion?entry=@", api="/audit", scope="audit:query"),
    ),
    row(
        "audit-ingest",
        Endpoint("POST", "/audit/events", '{"events": ["@"]}', api="/audit", scope="audit:ingest"),
    ),
    # ---- security events, SSF
    row("events-after", Endpoint("GET", "/events?after=@", api="/events", scope="event:subscribe")),
    row("ssf-read", Endpoint("GET", "/ssf/stream?stream_id=@", api="/ssf", scope="ssf:stream")),
    row(
        "ssf-create",
        Endpoint("POST", "/ssf/stream", '{"description": "@"}', api="/ssf", scope="ssf:stream"),
    ),
    row(
        "ssf-update", Endpoint("PATCH", "/ssf/stream", STREAM_BODY, api="/ssf", scope="ssf:stream")
    ),
    row("ssf-replace", Endpoint("PUT", "/ssf/stream", STREAM_BODY, api="/ssf", scope="ssf:stream")),
    row(
        "ssf-delete", Endpoint("DELETE", "/ssf/stream?stream_id=@", api="/ssf", scope="ssf:stream")
    ),
    row("ssf-status", Endpoint("GET", "/ssf/status?stream_id=@", api="/ssf", scope="ssf:stream")),
    row(
        "ssf-set-status",
        Endpoint(
            "POST",
            "/ssf/status",
            '{"stream_id": "@", "status": "paused"}',
            api="/ssf",
            scope="ssf:stream",
        ),
    ),
    row(
        "ssf-verify",
        Endpoint("POST", "/ssf/verify", '{"stream_id": "@"}', api="/ssf", scope="ssf:stream"),
    ),
    row(
        "ssf-poll-path",
        Endpoint(
            "POST", "/ssf/poll/@", '{"returnImmediately": true}', api="/ssf", scope="ssf:stream"
        ),
    ),
    row(
        "ssf-poll-ack",
        Endpoint(
            "POST",
            "/ssf/poll/s1",
            '{"returnImmediately": true, "ack": ["@"]}',
            api="/ssf",
            scope="ssf:stream",
        ),
    ),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    async with running_server(request, tmp_path_factory, "postgresql") as started:
        yield started


async def bearer(server: Server, endpoint: Endpoint) -> dict[str, str]:
    if endpoint.api is None:
        return {}
    if endpoint.api == "register":
        token = await server.services.clients.create_initial_access_token("tests", lei=LEI)
        return {"Authorization": f"Bearer {token}"}
    token = issue_access_token(
        server.services.keys.ring,
        issuer=server.issuer,
        subject=server.kit.client_id,
        client_id=server.kit.client_id,
        audience=internal_audience(server.issuer, endpoint.api),
        scopes=(endpoint.scope,),
        lifetime=300,
        extra={"lei": LEI},
    ).token
    return {"Authorization": f"Bearer {token}"}


async def row_counts(server: Server) -> dict[str, int]:
    """Rows per table, the audit ledger's left out (refusals are audited)."""
    tables = [t for t in metadata.sorted_tables if not t.name.startswith("audit")]
    async with server.services.db.transaction() as conn:
        return {
            t.name: (await conn.execute(select(func.count()).select_from(t))).scalar_one()
            for t in tables
        }


def request_of(endpoint: Endpoint, bad: Input) -> tuple[str, bytes | None, dict[str, Any]]:
    """The target, body and header fields of ``endpoint`` with ``bad`` in its ``@``."""
    headers: dict[str, Any] = {}
    target, body = endpoint.target, endpoint.body
    if endpoint.header is not None:
        headers[endpoint.header] = bad.header
    elif "@" in target:
        target = target.replace("@", bad.form)
    elif body is not None:
        body = body.replace("@", bad.form if endpoint.kind == FORM else bad.json)
    if body is not None:
        headers["Content-Type"] = endpoint.kind
    return target, None if body is None else body.encode(), headers


def where(endpoint: Endpoint) -> str:
    if endpoint.header is not None:
        return "header"
    return "target" if "@" in endpoint.target else "body"


def refused_for_itself(endpoint: Endpoint, bad: Input) -> str | None:
    """The code a string must be refused with for what it is (400), or None (any 4xx, or a 2xx
    when the endpoint can take it: a U+FFFD in a query, a long id that names nothing)."""
    if bad.code_known:  # a NUL, wherever it is
        return endpoint.error if where(endpoint) == "body" else "invalid_request"
    if bad.name == "surrogate" and where(endpoint) == "body":
        return endpoint.error
    return None


@pytest.mark.parametrize("bad", INPUTS, ids=lambda bad: bad.name)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_string_postgresql_cannot_hold_is_a_4xx_and_writes_nothing(
    server: Server, endpoint: Endpoint, bad: Input
) -> None:
    target, body, headers = request_of(endpoint, bad)
    headers.update(await bearer(server, endpoint))
    before = await row_counts(server)
    answer = await server.http.request(endpoint.method, target, content=body, headers=headers)
    code = refused_for_itself(endpoint, bad)
    status, kind = answer.status_code, answer.headers.get("content-type", "").split(";")[0]
    assert status < 500, (status, answer.text[:300])
    if status < 400:  # taken: and the work it asked for was done (not failed closed on a write)
        assert code is None, (status, answer.text[:300])
        assert "audit_unavailable" not in answer.text, answer.text[:300]
        return
    if code is not None:
        assert status == 400, (status, answer.text[:300])
    if endpoint.page and kind == "text/html":  # RFC 6749 §4.1.2.1: shown, not redirected
        assert await row_counts(server) == before
        return
    assert kind == JSON, answer.headers
    wire = answer.json()
    assert isinstance(wire.get("error"), str), wire
    if code is not None:
        assert wire["error"] == code, wire
    assert await row_counts(server) == before
