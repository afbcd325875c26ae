"""The parties' wiring: clients (operator-made or RFC 7591), trust profiles with an ``ssf`` member,
token requests with private_key_jwt, and Alice's authorization code + PKCE + consent."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from trustplane.demo.processes import DemoFailed, Deployment, expect
from trustplane.jose.jwk import thumbprint
from trustplane.jose.jws import b64url_encode
from trustplane.keys.crypto import public_jwk
from trustplane.pep import PrivateKeyJwt

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
REDIRECT_URI = "https://orders.arranger.example/callback"
#: Audiences (RFC 8707 resources) of the parties' APIs.
ARRANGER_ORDERS = "https://orders.arranger.example/api"
BROKER_EXECUTION = "https://execution.broker.example/api"
CLEARING_SETTLEMENT = "https://settlement.clearing.example/api"
#: ISO 17442 LEIs with valid check digits (example entities).
NORTHWIND = "529900T8BM49AURSDO55"
ARRANGER = "5493001KJTIIGC8Y1R12"
BROKER = "213800BROKERCLR10051"
ALICE_PASSWORD = "correct horse battery staple 42"
SCOPES = "order:create settlement:submit"
BROKER_DESK = "trade:execute allocation:propose allocation:approve"
CLEARING_OPS = "settlement:confirm exception:view exception:resolve event:subscribe report:view"
TRADE = {
    "type": "trade_instruction",
    "actions": ["create_order"],
    "accounts": ["ACC-1"],
    "instrument_classes": ["bond"],
    "max_notional": {"amount": 500_000_000, "currency": "EUR", "minor_units": 2},
}
#: Each deployment's scope vocabulary: business verbs bound to the audiences that accept them.
VOCABULARY = {
    "arranger": {ARRANGER_ORDERS: SCOPES, BROKER_EXECUTION: SCOPES},
    "broker": {
        BROKER_EXECUTION: f"{SCOPES} {BROKER_DESK}",
        CLEARING_SETTLEMENT: "settlement:submit",
    },
    "clearing": {CLEARING_SETTLEMENT: f"settlement:submit {CLEARING_OPS}"},
}
_HIDDEN = re.compile(r'<input type="hidden" name="(\w+)" value="([^"]*)">')


def claims_of(token: str) -> dict[str, Any]:
    """A JWT's payload, for display and routing (every token is validated by a PEP before use)."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


class DpopKey:
    """A client's DPoP key (RFC 9449): a fresh proof per request (§4.2), ``ath`` when it goes with
    an access token (§7.1)."""

    def __init__(self) -> None:
        self.key = new_key()
        self.jwk = public_jwk(self.key)
        self.jkt = thumbprint(self.jwk)

    def proof(self, htm: str, htu: str, access_token: str | None = None) -> str:
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16), "htm": htm, "htu": htu, "iat": int(time.time()),
        }  # fmt: skip
        if access_token is not None:
            claims["ath"] = b64url_encode(hashlib.sha256(access_token.encode("ascii")).digest())
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk}
        signing_input = ".".join(b64url_encode(json.dumps(p).encode()) for p in (header, claims))
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{b64url_encode(signature)}"


@dataclass(eq=False)
class Party:
    """A deployment and what its operator made there."""

    d: Deployment

    @property
    def name(self) -> str:
        return self.d.name

    @property
    def issuer(self) -> str:
        return self.d.issuer

    def client(
        self,
        name: str,
        scope: str,
        *resources: str,
        key: ec.EllipticCurvePrivateKey | None = None,
        **metadata: Any,
    ) -> Pending:
        """An operator's ``client`` action (what ``trustplane clients add`` registers): a
        private_key_jwt client with ``key``'s public key; ``resources``: absolute audiences, or
        paths of this deployment (its own APIs). Only the operator may grant trustplane's own APIs
        and make a client the resource server of an audience (``resource_server_for``)."""
        key = key or new_key()
        jwk = {**public_jwk(key), "kid": "k1", "alg": "ES256"}
        raw = {
            "lei": ARRANGER,
            "client_name": name,
            "scope": scope,
            "allowed_resources": [r if "://" in r else f"{self.issuer}{r}" for r in resources],
            "token_endpoint_auth_method": "private_key_jwt",
            "grant_types": ["client_credentials"],
            "jwks": {"keys": [jwk]},
            **metadata,
        }
        return Pending(self, {"op": "client", "metadata": raw}, key)

    def subscription_client(self, downstream: Party) -> Pending:
        """``downstream``'s SSF client here: it authenticates with its own signing key (our
        operator registers its ``jwks_uri``) and may manage its streams (``ssf:stream``)."""
        raw = {
            "lei": ARRANGER,
            "client_name": f"{downstream.name} ssf receiver",
            "scope": "ssf:stream",
            "allowed_resources": [f"{self.issuer}/ssf"],
            "token_endpoint_auth_method": "private_key_jwt",
            "grant_types": ["client_credentials"],
            "jwks_uri": f"{downstream.issuer}/jwks",
        }
        return Pending(self, {"op": "client", "metadata": raw})

    def operate(self, batch: list[Pending]) -> None:
        """Run ``batch`` in this deployment's operator process; each item gets its result."""
        for item, result in zip(batch, self.d.operate([i.action for i in batch]), strict=True):
            item.result = result

    def trust(self, upstream: Party, lei: str, ssf_client: str, **profile: Any) -> dict[str, Any]:
        """A ``partner`` action: a trust profile for ``upstream`` with its issuer, its keys inline
        and its SSF transmitter with our client there, so our receiver subscribes by itself."""
        jwks = httpx.get(f"{upstream.issuer}/jwks", timeout=10).json()
        ssf = {
            "configuration_url": f"{upstream.issuer}/.well-known/ssf-configuration",
            "client_id": ssf_client,
        }
        document = trust_profile(upstream.name, upstream.name, upstream.issuer, jwks, lei, ssf=ssf)
        document.update(profile)
        return {"op": "partner", "document": document}

    def token(
        self, client: PrivateKeyJwt, dpop: DpopKey | None = None, **form: str
    ) -> dict[str, Any]:
        """``dpop``: with a proof of that key, for a DPoP-bound token (RFC 9449 §5)."""
        data, headers = dict(form), dict[str, str]()
        client.apply(data, headers)
        if dpop is not None:
            headers["DPoP"] = dpop.proof("POST", f"{self.issuer}/token")
        response = httpx.post(f"{self.issuer}/token", data=data, headers=headers, timeout=10)
        expect(response.status_code == 200, f"{self.name} /token: {response.text}")
        return dict(response.json())

    def own_token(self, client: PrivateKeyJwt, scope: str, resource: str) -> str:
        audience = resource if "://" in resource else f"{self.issuer}{resource}"
        answer = self.token(client, grant_type="client_credentials", scope=scope, resource=audience)
        return str(answer["access_token"])

    def exchange(
        self, client: PrivateKeyJwt, subject_token: str, dpop: DpopKey | None = None, **form: str
    ) -> str:
        answer = self.token(
            client, dpop, grant_type=EXCHANGE, subject_token=subject_token,
            subject_token_type=ACCESS_TOKEN, **form,
        )  # fmt: skip
        return str(answer["access_token"])

    def active(self, client: PrivateKeyJwt, token: str) -> bool:
        """RFC 7662 introspection, as ``client`` (a resource server of the token's audience)."""
        data, headers = {"token": token}, dict[str, str]()
        client.apply(data, headers)
        response = httpx.post(f"{self.issuer}/introspect", data=data, headers=headers, timeout=10)
        expect(response.status_code == 200, f"{self.name} /introspect: {response.text}")
        return bool(response.json()["active"])

    def ledger(self, auditor: PrivateKeyJwt, txn: str) -> list[dict[str, Any]]:
        """``GET /audit/transactions/{txn}``: the transaction's entries, each with its proof."""
        token = self.own_token(auditor, "audit:query", "/audit")
        response = httpx.get(
            f"{self.issuer}/audit/transactions/{txn}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        expect(response.status_code == 200, f"{self.name} ledger: {response.text}")
        return list(response.json()["entries"])

    def streams(self) -> int:
        """How many SSF streams partners have made here (read from the sandbox's own database)."""
        with sqlite3.connect(self.d.data_dir / "trustplane.db") as db:
            return int(db.execute("SELECT count(*) FROM ssf_streams").fetchone()[0])


@dataclass(eq=False)
class Pending:
    """An operator's action at ``party`` and, once :meth:`Party.operate` ran it, its result."""

    party: Party
    action: dict[str, Any]
    key: ec.EllipticCurvePrivateKey | None = None
    result: dict[str, Any] | None = None

    @property
    def client_id(self) -> str:
        if self.result is None:
            raise DemoFailed(f"{self.action['op']} at {self.party.name} has not run")
        return str(self.result["client_id"])

    def auth(self) -> PrivateKeyJwt:
        """The made client's private_key_jwt credentials."""
        assert self.key is not None
        return PrivateKeyJwt(self.client_id, self.key, "k1", self.party.issuer)


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _hidden(page: str) -> dict[str, str]:
    return {name: html.unescape(value) for name, value in _HIDDEN.findall(page)}


def trust_profile(
    partner_id: str, name: str, issuer: str, jwks: dict[str, Any], lei: str, **profile: Any
) -> dict[str, Any]:
    """A trust profile document for the partner at ``issuer``: its ES256 keys from ``jwks``
    inline, exchanged access tokens of at most 15 minutes, and ``profile``'s other members."""
    return {
        "partner_id": partner_id,
        "name": name,
        "lei": lei,
        "issuers": [issuer],
        "keys": {"jwks": {"keys": [k for k in jwks["keys"] if k.get("alg") == "ES256"]}},
        "algorithms": ["ES256"],
        "max_assertion_lifetime": 900,
        "accepted_token_types": [ACCESS_TOKEN],
        **profile,
    }


def authorize(browser: httpx.Client, client_id: str, **params: str) -> tuple[str, str]:
    """Alice's browser (``browser``: based at the arranger, no redirects followed) logs in at
    ``/authorize`` and approves ``client_id``'s request for the trade (code + PKCE + consent,
    RFC 6749 §4.1, RFC 7636, RFC 9396; ``params``: more request parameters). Returns the code and
    the PKCE verifier to redeem it with."""
    verifier, challenge = pkce_pair()
    request = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": SCOPES,
        "resource": ARRANGER_ORDERS,
        "state": secrets.token_urlsafe(16),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "authorization_details": json.dumps([TRADE]),
        **params,
    }
    login = browser.get("/authorize", params=request)
    expect(login.status_code == 200, f"authorize page: {login.status_code} {login.text[:300]}")
    form = {**_hidden(login.text), "username": "alice", "password": ALICE_PASSWORD}
    after_login = browser.post("/authorize/login", data=form)
    expect(after_login.status_code == 303, f"login: {after_login.status_code}")
    page = browser.get(after_login.headers["location"])
    expect('action="/authorize/consent"' in page.text, "no consent page after login")
    approved = browser.post(
        "/authorize/consent", data={**_hidden(page.text), "decision": "approve"}
    )
    expect(approved.status_code in (302, 303), f"consent: {approved.status_code}")
    callback = httpx.URL(approved.headers["location"])
    expect(str(callback).startswith(REDIRECT_URI), f"redirected to {callback}")
    expect(callback.params.get("state") == request["state"], "state mismatch")
    if "code" not in callback.params:
        raise DemoFailed(f"no code in the redirect: {callback}")
    return callback.params["code"], verifier


def consent(arranger: Party, client: PrivateKeyJwt) -> dict[str, Any]:
    """Step 1: Alice approves the order service at the arranger; the consent becomes mandate M v1
    and the code is redeemed for her token."""
    with httpx.Client(base_url=arranger.issuer, follow_redirects=False, timeout=30) as browser:
        code, verifier = authorize(browser, client.client_id)
    return arranger.token(
        client,
        grant_type="authorization_code",
        code=code,
        redirect_uri=REDIRECT_URI,
        code_verifier=verifier,
    )
