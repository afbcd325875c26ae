"""No input makes the server answer 500, and every refusal on an OAuth endpoint is an RFC 6749 §5.2
error body.

Two generators, both in process:
- schemathesis drives every operation of ``/openapi.json`` (the protocol endpoints are described by
  ``oauth/openapi.py``, registration by FastAPI), with valid credentials spliced into part of the
  cases so that the checks behind client authentication are reached too;
- hypothesis posts what no schema describes: raw bytes, odd content types, arbitrary Authorization
  headers, JWS-shaped assertions of random JSON, and correctly signed assertions with random claims.
"""

from __future__ import annotations

import base64
import json
import string
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from tests.conftest import (
    ASSERTION_TYPE,
    EXECUTION,
    LEI,
    ClientKit,
    make_settings,
    run_sync,
    truncate_all,
)
from trustplane.app import Services, create_app
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.storage.migrate import upgrade

PROTOCOL_PATHS = frozenset({"/token", "/introspect", "/revoke"})
OAUTH_PATHS = PROTOCOL_PATHS | {"/register", "/register/{client_id}"}
MAX_EXAMPLES = 25


# --------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class Target:
    """An app plus the credentials that let generated requests past client authentication."""

    app: Any
    secret_client: tuple[str, str]
    managed_client: tuple[str, str]  # client_id, registration access token (RFC 7592)
    initial_access_token: str


async def _provision(settings: Settings) -> tuple[tuple[str, str], tuple[str, str], str]:
    svc = Services.build(settings)
    await svc.start()
    try:
        base = {"lei": LEI, "scope": "order:create order:cancel", "allowed_resources": [EXECUTION]}
        secret = await svc.clients.register(
            {**base, "token_endpoint_auth_method": "client_secret_post"},
            initial_access_token=None,
        )
        managed = await svc.clients.register(
            {**base, "token_endpoint_auth_method": "client_secret_basic"},
            initial_access_token=None,
        )
        token = await svc.clients.create_initial_access_token("fuzz", lei=LEI)
    finally:
        await svc.stop()
    assert secret.client_secret
    assert managed.registration_access_token
    return (
        (secret.client.client_id, secret.client_secret),
        (managed.client.client_id, managed.registration_access_token),
        token,
    )


def build_target(database_url: str, data_dir: Path) -> Target:
    settings = make_settings(database_url, data_dir)
    secret, managed, token = run_sync(_provision(settings))
    return Target(create_app(settings), secret, managed, token)


async def _migrated_sqlite(data_dir: Path) -> str:
    url = f"sqlite+aiosqlite:///{data_dir / 'trustplane.db'}"
    db = Database(url)
    await upgrade(db)
    await db.dispose()
    return url


@pytest.fixture(scope="module")
def sqlite_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    data_dir = tmp_path_factory.mktemp("fuzz-sqlite")
    yield build_target(run_sync(_migrated_sqlite(data_dir)), data_dir)
    _shutdown_asgi_lifespans()


@pytest.fixture(scope="module")
def pg_target(pg_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    run_sync(truncate_all(pg_database))
    yield build_target(pg_database, tmp_path_factory.mktemp("fuzz-pg"))
    _shutdown_asgi_lifespans()


def _shutdown_asgi_lifespans() -> None:
    """schemathesis runs each app's lifespan once and keeps it; end it so the app's services stop."""
    from schemathesis.python.asgi import shutdown_lifespans

    shutdown_lifespans()


def _openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document. Building the app starts nothing and touches no database, so this
    is safe at import time (schemathesis needs the schema when pytest collects; its fixture-based
    lazy loader, ``schemathesis.pytest.from_fixture``, fails on pytest 9: ``Function._nodeid``)."""
    app = create_app(make_settings("sqlite+aiosqlite://", Path(tempfile.gettempdir())))
    try:
        document: dict[str, Any] = app.openapi()
    finally:
        run_sync(app.state.services.stop())  # never started: closes the HTTP client and engine
    return document


SCHEMA = schemathesis.openapi.from_dict(_openapi_document())
SCHEMA.config.generation.update(
    max_examples=MAX_EXAMPLES,
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
)


# --------------------------------------------------------------------------- schemathesis


def oauth_error_body(ctx: Any, response: Any, case: Any) -> bool | None:
    """RFC 6749 §5.2 / RFC 7591 §3.2.2: a refusal is a JSON object with an ``error`` string.

    404 and 405 are the router's answers (no such path, e.g. an encoded ``/`` in ``client_id``; a
    method like TRACE): the request never reached an OAuth endpoint, so they are not refusals."""
    status = response.status_code
    if case.operation.path in OAUTH_PATHS and 400 <= status < 500 and status not in (404, 405):
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("error"), str):
            raise AssertionError(f"{status} without an error body: {response.content[:200]!r}")
    return None


def exercise(case: Any, target: Target) -> None:
    """Splice real credentials into part of the cases, call the app, check the answer."""
    headers: dict[str, str] = {}
    path = case.operation.path
    if path in PROTOCOL_PATHS and isinstance(case.body, dict) and "client_secret" in case.body:
        case.body["client_id"], case.body["client_secret"] = target.secret_client
    elif path == "/register":
        headers["Authorization"] = f"Bearer {target.initial_access_token}"
    elif path == "/register/{client_id}":
        # A real registration access token always, so that the client lookup runs; the real
        # client_id in about half of the reads and updates, never in deletes (they would end it).
        client_id, token = target.managed_client
        headers["Authorization"] = f"Bearer {token}"
        generated = str((case.path_parameters or {}).get("client_id", ""))
        if case.method.upper() != "DELETE" and len(generated) % 2 == 0:
            case.path_parameters = {"client_id": client_id}
            if isinstance(case.body, dict) and case.body:
                case.body["client_id"] = client_id
    case.call_and_validate(
        app=target.app, headers=headers, checks=[not_a_server_error, oauth_error_body]
    )


@SCHEMA.parametrize()
@settings(deadline=None)
def test_schema_sqlite(case: Any, sqlite_target: Target) -> None:
    exercise(case, sqlite_target)


@pytest.mark.postgres
@SCHEMA.parametrize()
@settings(deadline=None)
def test_schema_postgresql(case: Any, pg_target: Target) -> None:
    exercise(case, pg_target)


# --------------------------------------------------------------------------- hypothesis

FORM = "application/x-www-form-urlencoded"
FIELDS = (
    "grant_type",
    "scope",
    "resource",
    "client_id",
    "client_secret",
    "client_assertion_type",
    "client_assertion",
    "token",
    "token_type_hint",
)
CLAIMS = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "typ", "alg", "kid", "crit")


#: Strings that have broken servers before: NUL (PostgreSQL refuses it), line breaks, separators.
NASTY = (
    "\x00",
    "a\x00b",
    "\r\n",
    "\t",
    " ",
    "%00",
    "\u2028",
    "\ufeff",
    "é",
    "🙂",
    "'",
    "\\",
    "null",
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
#: Claim/header objects whose names are mostly ones the server reads.
json_objects = st.dictionaries(
    st.sampled_from(CLAIMS) | st.text(max_size=8), json_values, max_size=8
)


@st.composite
def jws_shaped(draw: st.DrawFn, client_id: str) -> str:
    """Three base64url segments: random JSON header and claims (sometimes naming a real client and
    an allowed algorithm, so that signature checking is reached), random signature bytes."""
    header = draw(json_objects)
    if draw(st.booleans()):
        header["alg"] = draw(st.sampled_from(["ES256", "EdDSA", "PS256", "none", "HS256"]))
    claims = draw(json_objects)
    if draw(st.booleans()):
        claims["iss"] = claims["sub"] = client_id
    signature = draw(st.binary(max_size=80))
    segments = [b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode())]
    return ".".join([*segments, b64url(signature)])


def texts(client_id: str) -> st.SearchStrategy[str]:
    return (
        st.text(max_size=40)
        | st.sampled_from([client_id, ASSERTION_TYPE, "client_credentials", EXECUTION, *NASTY])
        | jws_shaped(client_id)
    )


@st.composite
def bodies(draw: st.DrawFn, client_id: str) -> bytes:
    """Raw bytes now and then; mostly a form of known parameter names (each once, as RFC 6749
    requires, so that parsing succeeds and the checks behind it run), sometimes with extras."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300))
    fields = draw(st.dictionaries(st.sampled_from(FIELDS), texts(client_id)))
    pairs = list(fields.items())
    pairs += draw(st.lists(st.tuples(st.text(max_size=10), texts(client_id)), max_size=2))
    return str(httpx.QueryParams(pairs)).encode()


header_text = st.text(alphabet=string.printable.strip("\r\n\x0b\x0c") + "éß", max_size=60)
authorizations = (
    st.none()
    | header_text
    | header_text.map("Basic ".__add__)
    | st.binary(max_size=60).map(lambda raw: "Basic " + base64.b64encode(raw).decode())
)
content_types = st.sampled_from(
    [FORM, FORM, FORM, f"{FORM}; charset=utf-8", "application/json", "text/plain", None]
)


def _headers(content_type: str | None, authorization: str | None) -> dict[str, bytes]:
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type.encode("latin-1")
    if authorization is not None:
        headers["authorization"] = authorization.encode("latin-1")
    return headers


def assert_oauth_error(response: httpx.Response, allowed: set[int]) -> None:
    assert response.status_code in allowed, (response.status_code, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict)
        assert isinstance(body.get("error"), str)
        event(f"{response.status_code} {body['error']}")  # --hypothesis-show-statistics
    else:
        event(str(response.status_code))


HYPOTHESIS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@HYPOTHESIS
@given(data=st.data())
async def test_garbage_is_refused_with_an_error_body(
    http: httpx.AsyncClient, kit: ClientKit, data: st.DataObject
) -> None:
    """Nothing authenticates here, so every answer is 400 or 401 with an ``error`` string."""
    path = data.draw(st.sampled_from(["/token", "/introspect", "/revoke"]), label="path")
    body = data.draw(bodies(kit.client_id), label="body")
    headers = _headers(
        data.draw(content_types, label="content-type"),
        data.draw(authorizations, label="authorization"),
    )

    response = await http.post(path, content=body, headers=headers)

    assert_oauth_error(response, {400, 401})


#: Mostly near now, so that a wrong value is often only slightly wrong.
times = json_values | st.integers(-400, 400).map(lambda offset: int(time.time()) + offset)


@HYPOTHESIS
@given(data=st.data())
async def test_signed_assertions_with_arbitrary_claims(
    http: httpx.AsyncClient, kit: ClientKit, data: st.DataObject
) -> None:
    """Correctly signed by a registered client, so the claim checks themselves are fuzzed: each
    claim is kept valid, dropped or replaced by a random value. A valid combination gets through,
    hence 200 is allowed; every 400 or 401 must carry an error body."""
    now = int(time.time())
    claims: dict[str, Any] = {"iss": kit.client_id, "sub": kit.client_id}
    for name, valid, random in (
        ("aud", kit.issuer, json_values),
        ("exp", now + 60, times),
        ("iat", now, times),
        ("nbf", now, times),
        ("jti", uuid.uuid4().hex, json_values | st.text(max_size=300) | st.sampled_from(NASTY)),
    ):
        choice = data.draw(st.sampled_from(["valid", "valid", "absent", "random"]), label=name)
        if choice != "absent":
            claims[name] = valid if choice == "valid" else data.draw(random, label=name)
    values = st.text(max_size=30) | st.sampled_from(NASTY)
    extra = data.draw(st.dictionaries(st.sampled_from(FIELDS), values), label="form")
    form = {
        **{k: v for k, v in extra.items() if k not in ("client_id", "client_secret")},
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": jwt.encode(
            claims, kit.key, algorithm="ES256", headers={"kid": kit.kid}
        ),
    }

    response = await http.post("/token", data=form)

    assert_oauth_error(response, {200, 400, 401})


@HYPOTHESIS
@given(jti=st.text(max_size=300) | st.sampled_from(NASTY))
async def test_any_jti_in_a_valid_assertion(
    http: httpx.AsyncClient, kit: ClientKit, jti: str
) -> None:
    """Everything else valid: the jti is accepted once (200) or refused (401), never a failed write
    (a NUL cannot be stored in PostgreSQL, and a failed batch would fail its neighbours too)."""
    form = {
        "grant_type": "client_credentials",
        "scope": "order:create",
        "resource": EXECUTION,
        **kit.auth(jti=jti or None),
    }

    response = await http.post("/token", data=form)

    assert_oauth_error(response, {200, 401})


@HYPOTHESIS
@given(data=st.data())
async def test_client_management_with_arbitrary_ids(
    http: httpx.AsyncClient, kit: ClientKit, data: st.DataObject
) -> None:
    """RFC 7592 reads, updates and deletes with any client_id in the path (NUL and other control
    characters included: PostgreSQL refuses a NUL in a query parameter) and any bearer token."""
    client_id = data.draw(
        (st.text(min_size=1, max_size=40) | st.sampled_from([kit.client_id, *NASTY])).filter(
            lambda text: text not in (".", "..")  # dot segments are resolved away by the client
        ),
        label="client_id",
    )
    method = data.draw(st.sampled_from(["GET", "PUT", "DELETE"]), label="method")
    token = data.draw(header_text.filter(str.strip), label="token")

    response = await http.request(
        method,
        f"/register/{quote(client_id, safe='')}",
        headers={"authorization": f"Bearer {token}".encode("latin-1")},
        json={"client_id": client_id} if method == "PUT" else None,
    )

    if "/" in client_id:  # an encoded slash is routed as a separator: no such route, or a redirect
        assert response.status_code in (307, 404, 405)
    elif "\x00" in client_id:  # refused at the entry (trustplane.limits), before any check
        assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    else:
        assert_oauth_error(response, {401})
