"""The example resource server (examples/resource_server) end to end: a real ``trustplane serve`` on
loopback, the example app served by uvicorn on another port, and httpx calls between them.

The example validates tokens with the PEP SDK (JWKS discovered from the issuer's RFC 8414 metadata)
and asks trustplane's PDP over AuthZEN with its own client-credentials token. Hostile tokens are minted
with PyJWT; where a hostile token must carry the issuer's real signature (expired, ID-token shaped),
the issuer's active key is read from the server's database with the test KEK.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import CLEARING, EXECUTION, KEK, LEI, ClientKit, free_port, new_ec_key, run_sync
from tests.e2e.conftest import (
    PROPAGATION_TIMEOUT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    LiveServer,
    _die_with_parent,
    client_credentials_token,
    redeem_code,
    register_client,
    running_servers,
    wait_until,
)
from trustplane.keys.crypto import decrypt_private_key
from trustplane.keys.store import KeyState, SqlKeyStore
from trustplane.settings import decode_kek
from trustplane.storage.db import Database

pytestmark = pytest.mark.e2e
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "resource_server"
UVICORN = (
    sys.executable,
    "-m",
    "uvicorn",
    "app:create_app_from_env",
    "--factory",
    "--host",
    "127.0.0.1",
    "--log-level",
    "warning",
)
INTROSPECTION_TTL = 5.0  # the example's RevocationCheck ttl


@dataclass
class ExampleApp:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def post(self, path: str, body: Any, token: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.post(
            f"{self.base_url}{path}", json=body, headers=headers, timeout=15.0, **kwargs
        )

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        return self.log_path.read_text(errors="replace")


def start_example(server: LiveServer, rs: ClientKit, tmp: Path, **env: str) -> ExampleApp:
    port = free_port()
    key_file = tmp / f"rs-key-{port}.pem"
    key_file.write_bytes(rs.pem)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("RS_", "TRUSTPLANE_"))}
    environment.update(
        RS_ISSUER=server.issuer,
        RS_CLIENT_ID=rs.client_id,
        RS_CLIENT_KEY_FILE=str(key_file),
        RS_CLIENT_KID=rs.kid,
        RS_LEI=LEI,
        RS_ALLOW_LOOPBACK="1",
        **env,
    )
    log_path = tmp / f"example-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*UVICORN, "--port", str(port)],
            cwd=EXAMPLE_DIR,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    app = ExampleApp(f"http://127.0.0.1:{port}", process, log_path)

    def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"example app exited early:\n{log_path.read_text(errors='replace')}")
        try:
            return httpx.get(f"{app.base_url}/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, START_TIMEOUT, "the example resource server to start")
    return app


@dataclass
class World:
    server: LiveServer
    trader: ClientKit
    rs: ClientKit
    example: ExampleApp
    tmp: Path

    def token(self, scope: str = "order:create", resource: str = EXECUTION) -> str:
        return client_credentials_token(self.server, self.trader, scope, resource)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("pep-e2e")
    with running_servers(tmp) as servers:
        server = servers.start()
        pdp_audience = f"{server.issuer}/access/v1"
        rs = register_client(
            server,
            scopes=("decision:evaluate",),
            resources=(pdp_audience,),
            introspection_resources=(EXECUTION, CLEARING),
        )
        trader = register_client(server)
        example = start_example(server, rs, tmp, RS_INTROSPECT="1")
        try:
            yield World(server, trader, rs, example, tmp)
        finally:
            log = example.stop()
        assert "Traceback" not in log, log


ORDER = {
    "account": "ACC-1",
    "instrument": "XS0000000001",
    "side": "buy",
    "amount_minor": 250_000_00,
    "currency": "EUR",
    "venue_mic": "XLON",
}


def challenge(response: httpx.Response) -> dict[str, str]:
    value = response.headers["www-authenticate"]
    assert value.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


# --------------------------------------------------------------------------- hostile tokens


def issuer_key(server: LiveServer) -> tuple[str, bytes]:
    """The server's active signing key (kid, PEM), read from its database with the test KEK."""

    async def load() -> tuple[str, bytes]:
        db = Database(server.env["TRUSTPLANE_DATABASE_URL"])
        try:
            async with db.read() as conn:
                keys = await SqlKeyStore().list(conn)
        finally:
            await db.dispose()
        active = next(k for k in keys if k.state is KeyState.ACTIVE)
        assert active.private_key is not None
        key = decrypt_private_key(active.private_key, decode_kek(KEK), active.kid)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return active.kid, pem

    result: tuple[str, bytes] = run_sync(load())
    return result


def claims(world: World, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {
        "iss": world.server.issuer,
        "sub": world.trader.client_id,
        "aud": EXECUTION,
        "exp": now + 300,
        "iat": now,
        "nbf": now,
        "jti": uuid.uuid4().hex,
        "client_id": world.trader.client_id,
        "scope": "order:create",
        "lei": LEI,
    }
    out.update(overrides)
    return out


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256_with_public_key(world: World) -> str:
    """Key confusion: HMAC keyed with the issuer's published public key (PEM of its JWKS entry)."""
    jwks = httpx.get(f"{world.server.base_url}/jwks", timeout=10.0).json()
    public = jwt.PyJWK(jwks["keys"][0]).key
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "at+jwt", "kid": jwks["keys"][0]["kid"]}
    signing_input = (
        f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims(world)).encode())}"
    )
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def signed_by_issuer(world: World, typ: str = "at+jwt", **overrides: Any) -> str:
    kid, pem = issuer_key(world.server)
    return jwt.encode(
        claims(world, **overrides), pem, algorithm="ES256", headers={"kid": kid, "typ": typ}
    )


HOSTILE: list[tuple[str, Any, str]] = [
    ("wrong audience", lambda w: w.token("settlement:submit", CLEARING), "not meant for"),
    (
        "wrong issuer",
        lambda w: jwt.encode(
            claims(w, iss="https://evil.example"),
            new_ec_key(),
            algorithm="ES256",
            headers={"typ": "at+jwt", "kid": "evil"},
        ),
        "issuer is not trusted",
    ),
    ("expired", lambda w: signed_by_issuer(w, exp=int(time.time()) - 120), "expired"),
    (
        "alg none",
        lambda w: jwt.encode(claims(w), None, algorithm="none", headers={"typ": "at+jwt"}),
        "not allowed",
    ),
    ("HS256 signed with the public key", hs256_with_public_key, "not allowed"),
    (
        "ID-token shaped, no at+jwt",
        lambda w: signed_by_issuer(w, typ="JWT", aud=w.trader.client_id, nonce="n-0S6"),
        "typ must be at+jwt",
    ),
]


@pytest.mark.parametrize(
    ("make", "description"), [(h[1], h[2]) for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_tokens_are_invalid_token(world: World, make: Any, description: str) -> None:
    response = world.example.post("/orders", ORDER, make(world))

    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_token"
    assert description in response.json()["error_description"]
    params = challenge(response)
    assert params["error"] == "invalid_token"
    assert params["realm"] == "execution"


# --------------------------------------------------------------------------- the flows


def test_order_then_settlement_allowed(world: World) -> None:
    order = world.example.post("/orders", ORDER, world.token())
    assert order.status_code == 201, order.text
    assert order.json()["client_id"] == world.trader.client_id

    settlement = world.example.post(
        "/settlements",
        {"order_id": order.json()["order_id"]},
        world.token("settlement:submit", CLEARING),
    )

    assert settlement.status_code == 201, settlement.text
    assert settlement.json()["order_id"] == order.json()["order_id"]


def test_missing_token(world: World) -> None:
    response = world.example.post("/orders", ORDER)

    assert response.status_code == 401
    assert challenge(response) == {"realm": "execution"}


def test_token_in_the_query_string(world: World) -> None:
    token = world.token()
    response = world.example.post("/orders", ORDER, params={"access_token": token})

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert challenge(response)["error"] == "invalid_request"


def test_insufficient_scope(world: World) -> None:
    response = world.example.post("/orders", ORDER, world.token("order:cancel"))

    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert challenge(response)["scope"] == "order:create"


@pytest.mark.parametrize(
    "change",
    [{"account": "ACC-9"}, {"instrument": "XS0000000666"}, {"amount_minor": 20_000_000_00}],
    ids=["another entity's account", "restricted instrument", "large ticket without approval"],
)
def test_policy_deny_is_insufficient_scope(world: World, change: dict[str, Any]) -> None:
    response = world.example.post("/orders", {**ORDER, **change}, world.token())

    assert response.status_code == 403, response.text
    assert response.json()["error"] == "insufficient_scope"
    assert "denied by policy" in response.json()["error_description"]


def test_large_ticket_with_approval_is_allowed(world: World) -> None:
    body = {**ORDER, "amount_minor": 20_000_000_00, "approval_id": "APR-7"}

    assert world.example.post("/orders", body, world.token()).status_code == 201


def test_settlement_of_a_trade_that_was_never_executed_is_denied(world: World) -> None:
    response = world.example.post(
        "/settlements", {"order_id": "ORD-none"}, world.token("settlement:submit", CLEARING)
    )

    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"


def test_revoked_token_is_refused_within_the_introspection_ttl(world: World) -> None:
    token = world.token()
    assert world.example.post("/orders", ORDER, token).status_code == 201

    revoked = httpx.post(
        f"{world.server.base_url}/revoke", data={"token": token, **world.trader.auth()}, timeout=10
    )
    assert revoked.status_code == 200

    refused = wait_until(
        lambda: (r := world.example.post("/orders", ORDER, token)).status_code == 401 and r,
        INTROSPECTION_TTL + PROPAGATION_TIMEOUT,
        "the revocation to reach the resource server",
        step=0.5,
    )
    assert refused.json()["error_description"] == "the access token has been revoked"


def test_unreachable_pdp_fails_closed(world: World) -> None:
    dead = start_example(
        world.server, world.rs, world.tmp, RS_PDP_URL=f"http://127.0.0.1:{free_port()}"
    )
    try:
        response = dead.post("/orders", ORDER, world.token())
        assert response.status_code == 503
        assert response.json()["error"] == "temporarily_unavailable"
        metrics = httpx.get(f"{dead.base_url}/metrics", timeout=5.0).text
        assert "trustplane_pep_pdp_unavailable_total 1.0" in metrics
        assert (
            'trustplane_pep_refused_total{error="temporarily_unavailable",reason="pdp_unreachable"} 1.0'
            in metrics
        )
    finally:
        dead.stop()


def test_tokens_signed_after_a_key_rotation_are_accepted(world: World) -> None:
    """trustplane publishes the next key before it signs anything, so the PEP already holds it when
    `trustplane keys rotate` makes it active."""
    first = world.token()
    before = jwt.get_unverified_header(first)["kid"]
    assert world.example.post("/orders", ORDER, first).status_code == 201  # keys are cached now
    jwks_fetches = (
        f'trustplane_pep_jwks_fetches_total{{issuer="{world.server.issuer}",outcome="ok"}}'
    )

    def metric() -> str:
        return httpx.get(f"{world.example.base_url}/metrics", timeout=5.0).text

    fetched = [line for line in metric().splitlines() if line.startswith(jwks_fetches)]
    world.server.cli("keys", "rotate")

    def rotated_token() -> str | None:
        token = world.token()
        return token if jwt.get_unverified_header(token)["kid"] != before else None

    token = wait_until(rotated_token, PROPAGATION_TIMEOUT, "the server to sign with the new key")

    assert world.example.post("/orders", ORDER, token).status_code == 201
    assert [line for line in metric().splitlines() if line.startswith(jwks_fetches)] == fetched


def test_a_revoked_mandate_stops_its_tokens_at_the_resource_server(world: World) -> None:
    """Issue 5 point 6 at the edge: a person's token is accepted by the resource server's PEP until
    the mandate behind it is revoked; then introspection says inactive and the PEP refuses it."""
    from tests.authorize.flow import TRADE, pkce_pair, query_of
    from tests.e2e.test_authorization_flow import (
        USER_LEI,
        Callback,
        add_user,
        approve,
        authorize_url,
        register_code_client,
        user_agent,
    )

    server = world.server
    add_user(server, "alice-pep")
    kit = register_code_client(server)
    verifier, code_challenge = pkce_pair()
    detail = {**TRADE, "accounts": ["ACC-9"]}  # ACC-9 belongs to the user's own legal entity
    callback = Callback()
    with user_agent(server, callback) as agent:
        approve(agent, authorize_url(server, kit, code_challenge, "pep", [detail]), "alice-pep")
    code = query_of(str(callback.hits[0]))["code"]
    issued = redeem_code(server, kit, code, verifier)
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["lei"] == USER_LEI
    order = {**ORDER, "account": "ACC-9"}
    accepted = world.example.post("/orders", order, token)
    assert accepted.status_code == 201, accepted.text

    server.cli("mandates", "revoke", claims["mandate"]["id"], "--reason", "client offboarded")

    refused = wait_until(
        lambda: (r := world.example.post("/orders", order, token)).status_code == 401 and r,
        INTROSPECTION_TTL + PROPAGATION_TIMEOUT,
        "the mandate revocation to reach the resource server",
        step=0.5,
    )
    assert refused.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
