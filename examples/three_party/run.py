"""Three deployments, one trade: steps 1-4 of trustplane's reference lifecycle over real HTTP.

    python examples/three_party/run.py [--workdir DIR] [--keep]

Starts three ``trustplane serve`` processes on free loopback ports, each with its own data directory,
SQLite database and signing keys: the ARRANGER, the BROKER and the CLEARING broker. They are
federated only by trust profiles (``trustplane partners add``). Every listener speaks HTTPS with a
certificate of a private CA the script makes at start in ``WORKDIR/pki`` (``trustplane.tls.dev_ca``;
removed with the work directory). The partner clients (the arranger's order service, the broker's
execution service) authenticate with private_key_jwt and call over mutual TLS with their client
certificates; they are registered with ``tls_client_certificate_bound_access_tokens``, so every token
they obtain, the exchanged ones included, carries ``cnf.x5t#S256`` of their own certificate (RFC 8705
§3), and Alice's token is DPoP-bound as well (``cnf.jkt``, RFC 9449). Then:

1. Alice (Northwind AM) logs in at the arranger and approves the arranger's order service: code +
   PKCE + consent; the consent becomes mandate M v1 and Alice's token refers to it. The code is
   bound to her session's DPoP key (``dpop_jkt``) and redeemed with a proof of it. Her order is
   handed in at the arranger's order intake with ``Authorization: DPoP`` and a proof; the same token
   as ``Bearer``, a replayed proof or another key's proof are refused (401).
2. The arranger's order service exchanges Alice's token (RFC 8693) for a broker-audience token:
   ``act`` = the order service, narrowed authorization_details, a new ``txn``, mandate M kept.
3. The broker's execution API (``services.py``: a FastAPI app behind the PEP SDK, trusting the
   arranger's issuer) validates that token, checks the order against its authorization_details, asks
   the BROKER's PDP over AuthZEN, executes, and emits ``trade.executed`` with the transaction envelope.
   An order above the token's notional is refused (403); the token without the order service's
   certificate is refused (401 ``invalid_token``).
4. The broker exchanges it AT THE BROKER's deployment (the arranger is a trusted partner there) for a
   clearing-audience token with ``settlement:submit`` only; ``act`` chain broker -> arranger. The
   clearing's settlement API (trusting the broker's issuer) validates it, checks the provenance chain
   (``prv``: the broker token came from the arranger's token, which came from Alice's), asks the
   CLEARING's PDP over AuthZEN (the trade must be executed) and submits the settlement with an
   ``Idempotency-Key``: a retry returns the stored result; the key with another body is refused (422);
   no key is refused (400); the broker-audience token is refused there (401); the clearing token
   without the broker's certificate, or from the arranger's certificate, is refused (401).
6. Compliance reads each deployment's ledger for the transaction: the original and derived token of
   every exchange, with inclusion proofs.

Every step is printed; the script exits 1 at the first failure (and prints the servers' logs).
Needs only the trustplane package installed (``pip install -e .``): run it from the repository root.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from services import (
    Books,
    Membership,
    PdpAccess,
    Served,
    ServerTls,
    TradeFeed,
    execution_api,
    order_intake_api,
    settlement_api,
)

from trustplane.demo.parties import (
    ACCESS_TOKEN,
    ALICE_PASSWORD,
    ARRANGER,
    ARRANGER_ORDERS,
    BROKER,
    BROKER_EXECUTION,
    CLEARING_SETTLEMENT,
    EXCHANGE,
    NORTHWIND,
    REDIRECT_URI,
    SCOPES,
    TRADE,
    authorize,
    claims_of,
    trust_profile,
)
from trustplane.demo.processes import DemoFailed, clean_env, expect, free_port, scopes_toml
from trustplane.jose.jwk import thumbprint
from trustplane.keys.crypto import public_jwk
from trustplane.logging import configure_logging
from trustplane.pep import PrivateKeyJwt
from trustplane.tls import certificate_thumbprint, dev_ca

TRUSTPLANE = shutil.which("trustplane") or str(Path(sys.executable).with_name("trustplane"))
CLEARING_ACCOUNT = "CLR-BRK-001"  # the broker's account at the clearing broker
BOND = "XS0000000001"
#: Step 2 narrows the consented details to this one order's notional.
ORDER = {**TRADE, "max_notional": {"amount": 120_000_000, "currency": "EUR", "minor_units": 2}}
#: The order the broker executes (1m EUR of a bond on ACC-1), and its settlement instruction.
ORDER_IN = {"account": "ACC-1", "instrument": BOND, "side": "buy", "amount_minor": 100_000_000,
            "currency": "EUR"}  # fmt: skip
#: Each deployment's scope vocabulary: business verbs bound to the audiences that accept them.
VOCABULARY = {
    "arranger": {ARRANGER_ORDERS: SCOPES, BROKER_EXECUTION: SCOPES},
    "broker": {BROKER_EXECUTION: SCOPES, CLEARING_SETTLEMENT: "settlement:submit"},
    "clearing": {CLEARING_SETTLEMENT: "settlement:submit"},
}


@dataclass(frozen=True)
class Identity:
    """A TLS client certificate of the example's private CA and its key (files in the PKI dir)."""

    name: str
    certificate: x509.Certificate
    cert_file: Path
    key_file: Path

    @property
    def x5t(self) -> str:
        """RFC 8705 §3.1 ``x5t#S256``: what a token bound to this certificate names in ``cnf``."""
        return certificate_thumbprint(self.certificate)


@dataclass
class Pki:
    """The example's private CA, made at start in ``WORKDIR/pki`` (``trustplane.tls.dev_ca``, the
    module behind ``trustplane dev ca``) and removed with the work directory: one server certificate
    per listener (IP SAN 127.0.0.1) and one client certificate per partner client."""

    directory: Path
    ca: dev_ca.Issued

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(mode=0o700, parents=True, exist_ok=False)
        ca = dev_ca.create_ca("trustplane three-party example CA")
        ca.write(directory, "ca")
        return cls(directory, ca)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def server(self, name: str) -> ServerTls:
        subject = dev_ca.Subject(f"{name}.example", ips=("127.0.0.1",), dns=("localhost",))
        cert, key = dev_ca.issue(self.ca, subject, server=True).write(self.directory, name)
        return ServerTls(cert, key, self.ca_file)

    def client(self, name: str, organization: str) -> Identity:
        issued = dev_ca.issue(self.ca, dev_ca.Subject(name, organization))
        cert, key = issued.write(self.directory, name)
        return Identity(name, issued.certificate, cert, key)

    def http(self, identity: Identity | None = None, **options: Any) -> httpx.Client:
        """An HTTPS client trusting only this CA; with ``identity``, presenting its certificate."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if identity is not None:
            context.load_cert_chain(identity.cert_file, identity.key_file)
        return httpx.Client(verify=context, timeout=options.pop("timeout", 10), **options)


@dataclass(frozen=True)
class DpopKey:
    """A DPoP key (RFC 9449): proofs for one request each, ``jkt`` its RFC 7638 thumbprint."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    @property
    def jwk(self) -> dict[str, Any]:
        return public_jwk(self.key)

    @property
    def jkt(self) -> str:
        return thumbprint(self.jwk)

    def proof(self, htm: str, htu: str, access_token: str | None = None) -> str:
        claims: dict[str, Any] = {"jti": secrets.token_urlsafe(16), "htm": htm, "htu": htu}
        claims["iat"] = int(time.time())
        if access_token is not None:
            digest = hashlib.sha256(access_token.encode("ascii")).digest()
            claims["ath"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        headers = {"typ": "dpop+jwt", "jwk": self.jwk}
        return jwt.encode(claims, self.key, algorithm="ES256", headers=headers)


def step(number: str, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


def show(label: str, value: Any) -> None:
    rendered = json.dumps(value, indent=2) if isinstance(value, dict | list) else str(value)
    print(f"    {label}: " + rendered.replace("\n", "\n    "), flush=True)


@dataclass
class Deployment:
    name: str
    workdir: Path
    pki: Pki
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / self.name

    @property
    def env(self) -> dict[str, str]:
        env = clean_env()
        env.update(
            TRUSTPLANE_DATA_DIR=str(self.data_dir),
            TRUSTPLANE_DATABASE_URL=f"sqlite+aiosqlite:///{self.data_dir / 'trustplane.db'}",
            TRUSTPLANE_PORT=str(self.port),
            TRUSTPLANE_ISSUER=self.issuer,
            # HTTPS with the example CA's server certificate; a client certificate is optional at
            # the handshake and, when sent, must chain to the same CA (RFC 8705 binding and auth)
            TRUSTPLANE_TLS_CERTIFICATE=str(self.pki.directory / f"{self.name}.crt"),
            TRUSTPLANE_TLS_KEY=str(self.pki.directory / f"{self.name}.key"),
            TRUSTPLANE_TLS_CLIENT_CA=str(self.pki.ca_file),
            TRUSTPLANE_OPS_PORT="0",  # three servers on one host: no operations listener
            TRUSTPLANE_SCOPES_FILE=str(self.data_dir / "scopes.toml"),
            TRUSTPLANE_CACHE_REFRESH_INTERVAL="0.2",
            TRUSTPLANE_FEDERATION_ALLOW_INSECURE_LOOPBACK="true",  # partners on 127.0.0.1 (loopback)
            TRUSTPLANE_LOG_LEVEL="warning",
        )
        return env

    def cli(self, *args: str, stdin: str | None = None) -> Any:
        proc = subprocess.run(
            [TRUSTPLANE, *args, "--json"], env=self.env, input=stdin, capture_output=True,
            text=True, timeout=120, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise DemoFailed(f"{self.name}: trustplane {' '.join(args)}: {proc.stderr.strip()}")
        return json.loads(proc.stdout)

    def start(self) -> None:
        if self.data_dir.exists():
            raise DemoFailed(f"{self.data_dir} already exists: give an empty --workdir")
        self.data_dir.mkdir(parents=True)
        self.pki.server(self.name)
        (self.data_dir / "scopes.toml").write_text(scopes_toml(VOCABULARY[self.name]))
        log = (self.data_dir / "server.log").open("wb")
        self.process = subprocess.Popen(
            [TRUSTPLANE, "serve", "--port", str(self.port)], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, cwd=self.data_dir,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise DemoFailed(f"{self.name} exited early:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.TransportError), self.pki.http(timeout=1) as http:
                if http.get(f"{self.issuer}/healthz").status_code == 200:
                    return
            time.sleep(0.1)
        raise DemoFailed(f"{self.name} not healthy within {timeout:g} s")

    def log(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def register(self, **metadata: Any) -> PrivateKeyJwt:
        """A private_key_jwt client, registered over RFC 7591 with an initial access token."""
        token = self.cli("registration-token", "create", "--uses", "1", "--lei", ARRANGER)[
            "initial_access_token"
        ]
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = {**public_jwk(key), "kid": "k1", "alg": "ES256", "use": "sig"}
        body = {"lei": ARRANGER, "jwks": {"keys": [jwk]}, **metadata}
        with self.pki.http() as http:
            response = http.post(
                f"{self.issuer}/register", json=body, headers={"Authorization": f"Bearer {token}"}
            )
        expect(response.status_code == 201, f"{self.name}: registration: {response.text}")
        return PrivateKeyJwt(response.json()["client_id"], key, "k1", self.issuer)

    def operator_client(
        self, name: str, scope: str, api: str, *extra: str
    ) -> tuple[str, ec.EllipticCurvePrivateKey]:
        """A client registered by the operator (``trustplane clients add``): only the operator may
        grant trustplane's own APIs (the ledger, the PDP) as audiences, and make a client the
        resource server for an audience (``--resource-server``: it may exchange and introspect the
        tokens addressed there). ``api`` is a path of this deployment or an absolute audience."""
        key = ec.generate_private_key(ec.SECP256R1())
        jwks = self.data_dir / f"{name.replace(' ', '-')}-jwks.json"
        jwks.write_text(json.dumps({"keys": [{**public_jwk(key), "kid": "k1", "alg": "ES256"}]}))
        resource = api if api.startswith("https://") else f"{self.issuer}{api}"
        made = self.cli(
            "clients", "add", "--lei", ARRANGER, "--name", name, "--jwks-file", str(jwks),
            "--scope", scope, "--resource", resource, *extra,
            *(() if "--grant-type" in extra else ("--grant-type", "client_credentials")),
        )  # fmt: skip
        return made["client_id"], key

    def resource_server(self, name: str, audience: str, *resources: str) -> PrivateKeyJwt:
        """The service behind ``audience``, registered by the operator as its resource server: it
        exchanges the tokens it is called with (RFC 8693). A client that registers itself (RFC 7591)
        may call an audience but never becomes its resource server."""
        extra = [a for r in resources for a in ("--resource", r)]
        extra += ["--resource-server", audience, "--grant-type", EXCHANGE]
        extra += ["--grant-type", "client_credentials"]
        extra += ["--authorization-details-type", "trade_instruction"]
        extra += ["--certificate-bound-tokens"]  # RFC 8705 §3: its tokens name its certificate
        client_id, key = self.operator_client(name, SCOPES, audience, *extra)
        return PrivateKeyJwt(client_id, key, "k1", self.issuer)

    def auditor(self) -> PrivateKeyJwt:
        """A compliance client that may read the ledger (``audit:query``)."""
        client_id, key = self.operator_client("compliance", "audit:query", "/audit")
        return PrivateKeyJwt(client_id, key, "k1", self.issuer)

    def pdp_access(self, name: str) -> PdpAccess:
        """A resource server's registration that may ask this deployment's PDP over AuthZEN."""
        client_id, key = self.operator_client(name, "decision:evaluate", "/access/v1")
        return PdpAccess(self.issuer, client_id, key)

    def ledger(self, auditor: PrivateKeyJwt, txn: str) -> list[dict[str, Any]]:
        """``GET /audit/transactions/{txn}``: every ledger entry of the transaction, in order."""
        token = self.token(
            auditor, grant_type="client_credentials", scope="audit:query",
            resource=f"{self.issuer}/audit",
        )["access_token"]  # fmt: skip
        with self.pki.http() as http:
            response = http.get(
                f"{self.issuer}/audit/transactions/{txn}",
                headers={"Authorization": f"Bearer {token}"},
            )
        expect(response.status_code == 200, f"{self.name} ledger: {response.text}")
        return list(response.json()["entries"])

    def integrated(
        self, auditor: PrivateKeyJwt, txn: str, event_type: str, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """The transaction's entries once one of ``event_type`` is in the tree: an append is durable
        at once but the transaction API shows integrated entries only (the sequencer integrates
        every 0.2 s), so an auditor reading right after the exchange polls briefly."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.ledger(auditor, txn)
            if any(e["entry"]["type"] == event_type for e in entries):
                return entries
            if time.monotonic() > deadline:
                return entries
            time.sleep(0.2)

    def token(
        self,
        client: PrivateKeyJwt,
        identity: Identity | None = None,
        dpop: DpopKey | None = None,
        **form: str,
    ) -> dict[str, Any]:
        """A token request over HTTPS, authenticated with private_key_jwt; over mutual TLS with
        ``identity``'s certificate (a certificate-bound client's tokens carry ``cnf.x5t#S256``);
        with a DPoP proof of ``dpop`` (``cnf.jkt``, ``token_type: DPoP``)."""
        data = dict(form)
        headers: dict[str, str] = {}
        client.apply(data, headers)
        if dpop is not None:
            headers["DPoP"] = dpop.proof("POST", f"{self.issuer}/token")
        with self.pki.http(identity) as http:
            response = http.post(f"{self.issuer}/token", data=data, headers=headers)
        expect(response.status_code == 200, f"{self.name} /token: {response.text}")
        return dict(response.json())

    def trust(self, partner: Deployment, partner_id: str, lei: str, **profile: Any) -> None:
        """A trust profile for ``partner``: its issuer and its current public keys, inline."""
        with self.pki.http() as http:
            jwks = http.get(f"{partner.issuer}/jwks").json()
        document = trust_profile(partner_id, partner.name, partner.issuer, jwks, lei, **profile)
        path = self.data_dir / f"partner-{partner_id}.json"
        path.write_text(json.dumps(document))
        self.cli("partners", "add", str(path))


def consent(
    arranger: Deployment, client: PrivateKeyJwt, identity: Identity, session: DpopKey
) -> dict[str, Any]:
    """Step 1: Alice's browser (httpx) logs in and approves; the order service redeems the code
    over mutual TLS with a DPoP proof of Alice's session key (the code is bound to that key by
    ``dpop_jkt``, RFC 9449 §10), so her token is DPoP-bound."""
    with arranger.pki.http(base_url=arranger.issuer, follow_redirects=False, timeout=30) as browser:
        code, verifier = authorize(browser, client.client_id, dpop_jkt=session.jkt)
    return arranger.token(
        client,
        identity,
        session,
        grant_type="authorization_code",
        code=code,
        redirect_uri=REDIRECT_URI,
        code_verifier=verifier,
    )


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def refused(response: httpx.Response, status: int, what: str) -> str:
    """Check a refusal's status; return its error code (RFC 6750 JSON or RFC 9457 problem)."""
    expect(response.status_code == status, f"{what}: {response.status_code} {response.text[:300]}")
    body = response.json()
    return str(body.get("error") or body.get("title"))


def refused_token(
    response: httpx.Response, what: str, because: str, error: str = "invalid_token"
) -> str:
    """A 401 with ``error`` and its challenge (RFC 6750 §3, RFC 9449 §7.1), refused ``because``
    (a part of its error_description); returns ``401 <error> (<scheme> challenge)``."""
    got = refused(response, 401, what)
    expect(got == error, f"{what}: {got}, not {error}")
    challenge = response.headers.get("www-authenticate", "")
    expect(f'error="{error}"' in challenge, f"{what}: challenge {challenge!r}")
    description = str(response.json().get("error_description", ""))
    expect(because in description, f"{what}: refused for {description!r}")
    return f"401 {got} ({challenge.split(' ', 1)[0]} challenge)"


def decided(entry: dict[str, Any]) -> str:
    """A ledger entry in a word or three: a decision as ``allow <action>``, else its type."""
    kind = entry["entry"]["type"]
    if kind.startswith("policy:decision:"):
        verdict = "allow" if kind.endswith("allowed") else "deny"
        return f"{verdict} {(entry.get('payload') or {}).get('action', '?')}"
    return str(kind)


def run(workdir: Path) -> None:
    for name in ("arranger", "broker", "clearing", "pki"):  # before the CA is made
        if (workdir / name).exists():
            raise DemoFailed(f"{workdir / name} already exists: give an empty --workdir")
    pki = Pki.create(workdir / "pki")
    arranger = Deployment("arranger", workdir, pki)
    broker = Deployment("broker", workdir, pki)
    clearing = Deployment("clearing", workdir, pki)
    deployments = [arranger, broker, clearing]
    services: list[Served] = []
    connections = contextlib.ExitStack()  # the partner clients' mutual-TLS connections
    try:
        step("0", "a private CA for the example; three deployments over HTTPS (mutual TLS)")
        show("private CA", f"{pki.ca_file} ({pki.ca.certificate.subject.rfc4514_string()})")
        for d in deployments:
            d.start()
        for d in deployments:
            d.wait_ready()
            show(d.name, d.issuer)

        step("0", "register: Alice at the arranger; the order service; the broker's client; trust")
        arranger.cli(
            "users", "add", "alice", "--lei", NORTHWIND, "--name", "Alice Trader",
            "--password-stdin", stdin=ALICE_PASSWORD + "\n",
        )  # fmt: skip
        # the partner clients: private_key_jwt authenticates them, their certificates bind their
        # tokens (tls_client_certificate_bound_access_tokens, RFC 8705 §3)
        orders_tls = pki.client("arranger-orders", "Arranger")
        execution_tls = pki.client("broker-execution", "Broker")
        orders = arranger.register(
            client_name="Arranger order service",
            tls_client_certificate_bound_access_tokens=True,
            grant_types=["authorization_code", EXCHANGE],
            redirect_uris=[REDIRECT_URI],
            scope=SCOPES,
            allowed_resources=[ARRANGER_ORDERS, BROKER_EXECUTION],
            authorization_details_types=["trade_instruction"],
        )
        # the broker's operator makes its execution service the resource server of its API: it
        # exchanges the arranger's tokens it is called with (self-registration could not)
        execution = broker.resource_server(
            "Broker execution service", BROKER_EXECUTION, CLEARING_SETTLEMENT
        )
        # what the broker lets the arranger's subjects obtain here: clearing, settlement only
        broker.trust(
            arranger,
            "arranger",
            ARRANGER,
            allowed_scopes=["settlement:submit"],
            allowed_audiences=[CLEARING_SETTLEMENT],
        )
        clearing.trust(
            broker,
            "broker",
            BROKER,
            allowed_scopes=["settlement:submit"],
            allowed_audiences=[CLEARING_SETTLEMENT],
        )
        auditors = {d.name: d.auditor() for d in deployments}
        feed = TradeFeed()
        execution_service = Served(
            execution_api(
                audience=BROKER_EXECUTION, trusted_issuer=arranger.issuer, feed=feed,
                pdp=broker.pdp_access("broker execution API"),
                books=Books(accounts={"ACC-1": NORTHWIND}, instruments={BOND: ("bond", False)}),
                ca_file=pki.ca_file,
            ),
            free_port(), pki.server("execution-api"),
        )  # fmt: skip
        settlement_service = Served(
            settlement_api(
                audience=CLEARING_SETTLEMENT, feed=feed,
                member=Membership(broker.issuer, BROKER, CLEARING_ACCOUNT, arranger.issuer),
                pdp=clearing.pdp_access("clearing settlement API"),
                idempotency_db=f"sqlite+aiosqlite:///{clearing.data_dir / 'settlements.db'}",
                ca_file=pki.ca_file,
            ),
            free_port(), pki.server("settlement-api"),
        )  # fmt: skip
        intake_service = Served(
            order_intake_api(
                audience=ARRANGER_ORDERS, issuer=arranger.issuer, ca_file=pki.ca_file,
                pdp=arranger.pdp_access("arranger order intake"),
            ),
            free_port(), pki.server("intake-api"),
        )  # fmt: skip
        services = [intake_service, execution_service, settlement_service]
        for service in services:
            service.start()
        show("arranger order intake", intake_service.url)
        show("broker execution API", execution_service.url)
        show("clearing settlement API", settlement_service.url)
        show("arranger order service", orders.client_id)
        show("broker execution service", execution.client_id)
        time.sleep(1.0)  # the servers pick up new clients and partners within the refresh interval

        step("1", "Alice authorises the arranger (code + PKCE + consent) -> mandate M")
        session = DpopKey()  # the key of Alice's session at the order service
        alice = consent(arranger, orders, orders_tls, session)
        alice_claims = claims_of(alice["access_token"])
        expect("mandate" in alice_claims, "Alice's token has no mandate")
        expect(alice["token_type"] == "DPoP", f"Alice's token is {alice['token_type']}")
        expect(alice_claims["cnf"].get("jkt") == session.jkt, "Alice's token is not DPoP-bound")
        show(
            "Alice's token",
            {k: alice_claims[k] for k in ("iss", "sub", "aud", "scope", "mandate", "cnf")},
        )
        show("Alice's token type", f"{alice['token_type']} (cnf.jkt = the session's DPoP key)")

        step("1", "Alice's order at the arranger's order intake, with her DPoP-bound token")
        # the order service's calls go over mutual TLS with its certificate
        as_arranger = connections.enter_context(pki.http(orders_tls))
        intake_url = f"{intake_service.url}/intake"
        alice_token = alice["access_token"]
        proof = session.proof("POST", intake_url, alice_token)
        with_proof = {"Authorization": f"DPoP {alice_token}", "DPoP": proof}
        taken = as_arranger.post(intake_url, json=ORDER_IN, headers=with_proof)
        expect(taken.status_code == 202, f"intake: {taken.status_code} {taken.text}")
        expect(taken.json()["accepted_for"] == alice_claims["sub"], "intake: another subject")
        show("DPoP token + proof (+ the order service's certificate)", "202 accepted for Alice")
        error = refused_token(
            as_arranger.post(intake_url, json=ORDER_IN, headers=bearer(alice_token)),
            "Alice's DPoP-bound token as Bearer", "DPoP-bound",
        )  # fmt: skip
        show("Alice's DPoP-bound token replayed as Bearer", error)
        error = refused_token(
            as_arranger.post(intake_url, json=ORDER_IN, headers=with_proof),
            "the same proof again", "already been used", "invalid_dpop_proof",
        )  # fmt: skip
        show("the same DPoP proof again", error)
        thief = DpopKey().proof("POST", intake_url, alice_token)
        error = refused_token(
            as_arranger.post(
                intake_url, json=ORDER_IN,
                headers={"Authorization": f"DPoP {alice_token}", "DPoP": thief},
            ),
            "Alice's token with another key's proof", "not the key",
        )  # fmt: skip
        show("Alice's token with a proof of another key", error)

        step("2", "the arranger exchanges Alice's token for a broker-audience token")
        to_broker = arranger.token(
            orders,
            orders_tls,
            grant_type=EXCHANGE,
            subject_token=alice["access_token"],
            subject_token_type=ACCESS_TOKEN,
            resource=BROKER_EXECUTION,
            scope=SCOPES,
            authorization_details=json.dumps([ORDER]),
        )
        expect(to_broker["issued_token_type"] == ACCESS_TOKEN, "issued_token_type")
        t1 = claims_of(to_broker["access_token"])
        expect(t1["act"]["sub"] == orders.client_id, "act is not the arranger's order service")
        expect(t1["mandate"] == alice_claims["mandate"], "mandate not kept")
        expect(t1["authorization_details"] == [ORDER], "details not narrowed to the order")
        expect(t1.get("cnf") == {"x5t#S256": orders_tls.x5t}, f"broker token cnf: {t1.get('cnf')}")
        show(
            "broker token",
            {k: t1[k] for k in ("iss", "sub", "aud", "scope", "act", "txn", "prv", "cnf")},
        )
        show("broker token bound to", f"the arranger order service's certificate {orders_tls.x5t}")

        step("3", "the broker's execution API (PEP + broker PDP) executes; emits trade.executed")
        orders_url = f"{execution_service.url}/orders"
        executed = as_arranger.post(
            orders_url, json=ORDER_IN, headers=bearer(to_broker["access_token"])
        )
        expect(executed.status_code == 201, f"order: {executed.status_code} {executed.text}")
        trade = executed.json()
        expect(trade["envelope"]["txn"] == t1["txn"], "the trade event lost the transaction id")
        expect(trade["envelope"]["mandate"] == t1["mandate"], "the trade event lost the mandate")
        show("trade.executed", {k: trade[k] for k in ("trade_id", "state", "envelope")})
        too_big = {**ORDER_IN, "amount_minor": 150_000_000}
        error = refused(
            as_arranger.post(orders_url, json=too_big, headers=bearer(to_broker["access_token"])),
            403, "an order above the token's notional",
        )  # fmt: skip
        show("an order above the token's notional (1.2m EUR)", f"403 {error}")
        with pki.http() as no_certificate:
            error = refused_token(
                no_certificate.post(
                    orders_url, json=ORDER_IN, headers=bearer(to_broker["access_token"])
                ),
                "the broker token without the arranger's certificate",
                "none was presented",
            )
        show("the broker token without the arranger's certificate", error)

        step("4", "the broker exchanges for a clearing token (settlement:submit only)")
        to_clearing = broker.token(
            execution,
            execution_tls,
            grant_type=EXCHANGE,
            subject_token=to_broker["access_token"],
            subject_token_type=ACCESS_TOKEN,
            resource=CLEARING_SETTLEMENT,
            scope="settlement:submit",
        )
        t2 = claims_of(to_clearing["access_token"])
        expect(t2["scope"] == "settlement:submit", "the clearing token is not narrowed")
        expect(t2["txn"] == t1["txn"], "the transaction id did not travel")
        expect(t2["exp"] <= t1["exp"], "the clearing token outlives its subject token")
        expect(t2.get("cnf") == {"x5t#S256": execution_tls.x5t}, f"clearing cnf: {t2.get('cnf')}")
        show(
            "clearing token",
            {k: t2[k] for k in ("iss", "sub", "aud", "scope", "act", "prv", "cnf")},
        )
        show(
            "clearing token bound to",
            f"the broker execution service's certificate {execution_tls.x5t}",
        )

        step(
            "4", "the clearing's settlement API (PEP + provenance + clearing PDP), Idempotency-Key"
        )
        settle_url = f"{settlement_service.url}/settlements"
        instruction = {"trade_id": trade["trade_id"], "amount_minor": 100_000_000,
                       "currency": "EUR", "settlement_date": "2026-12-02"}  # fmt: skip
        key = f'"{secrets.token_hex(16)}"'  # an RFC 8941 sf-string
        headers = bearer(to_clearing["access_token"], **{"Idempotency-Key": key})
        # the broker calls the clearing over mutual TLS with its execution service's certificate
        as_broker = connections.enter_context(pki.http(execution_tls))
        first = as_broker.post(settle_url, json=instruction, headers=headers)
        expect(first.status_code == 201, f"settlement: {first.status_code} {first.text}")
        settlement = first.json()
        expect(settlement["act"][0]["iss"] == broker.issuer, "settled by someone else")
        show("settlement", settlement)
        retry = as_broker.post(settle_url, json=instruction, headers=headers)
        expect(retry.status_code == 201, f"retry: {retry.status_code} {retry.text}")
        expect(retry.json() == settlement, "the retry did not return the stored result")
        expect(retry.headers.get("idempotency-replayed") == "true", "the retry was not a replay")
        show("retry, same key and body", "201, the stored result (Idempotency-Replayed: true)")
        other = {**instruction, "amount_minor": 90_000_000}
        error = refused(as_broker.post(settle_url, json=other, headers=headers), 422, "reused key")
        show("same key, another body", f"422 {error}")
        no_key = bearer(to_clearing["access_token"])
        error = refused(as_broker.post(settle_url, json=instruction, headers=no_key), 400, "no key")
        show("no Idempotency-Key", f"400 {error}")
        wrong = bearer(to_broker["access_token"], **{"Idempotency-Key": key})
        error = refused(
            as_arranger.post(settle_url, json=instruction, headers=wrong), 401, "wrong token"
        )
        show("the broker-audience token at the clearing", f"401 {error}")
        own = broker.token(
            execution, execution_tls, grant_type="client_credentials",
            scope="settlement:submit", resource=CLEARING_SETTLEMENT,
        )["access_token"]  # fmt: skip
        flat = bearer(own, **{"Idempotency-Key": f'"{secrets.token_hex(16)}"'})
        error = refused(as_broker.post(settle_url, json=instruction, headers=flat), 403, "no chain")
        show("the broker's own token (no act chain, no provenance)", f"403 {error}")
        # sender constraint: the clearing token is useless to anyone without the broker's key
        stolen = bearer(to_clearing["access_token"], **{"Idempotency-Key": key})
        with pki.http() as no_certificate:
            error = refused_token(
                no_certificate.post(settle_url, json=instruction, headers=stolen),
                "the clearing token replayed as a plain Bearer token",
                "none was presented",
            )
        show("the clearing token replayed as a plain Bearer token (no certificate)", error)
        error = refused_token(
            as_arranger.post(settle_url, json=instruction, headers=stolen),
            "the clearing token from another client's certificate",
            "another client certificate",
        )
        show("the clearing token sent with the arranger's certificate (stolen)", error)
        listed = as_broker.get(settle_url).json()
        expect(len(listed) == 1, f"{len(listed)} settlements for one instruction")
        step("6", "compliance: each deployment's ledger for the transaction (original -> derived)")
        for d, derived in ((arranger, t1), (broker, t2)):
            entries = d.integrated(auditors[d.name], t2["txn"], "oauth:token:issued")
            issued = [e for e in entries if e["entry"]["type"] == "oauth:token:issued"]
            expect(len(issued) == 1, f"{d.name}: {len(issued)} issuance entries for the txn")
            entry = issued[0]["entry"]
            exchange = (issued[0]["payload"] or {})["exchange"]
            expect(exchange["derived_token"]["jti"] == derived["jti"], "derived token not named")
            original = {"iss": derived["prv"]["iss"], "jti": derived["prv"]["jti"]}
            expect(exchange["subject_token"] == original, "original token not named")
            expect(all("inclusion_proof" in e for e in entries), "entries without inclusion proofs")
            show(
                f"{d.name} ledger",
                {
                    "entries": [decided(e) for e in entries],
                    "actor_chain": entry["actor_chain"],
                    "original": exchange["subject_token"],
                    "derived": exchange["derived_token"],
                },
            )
        # the resource servers' PEPs sent the token's txn with each question: their PDPs' decisions
        # are in the same transaction (the broker's order:create above; the clearing's here)
        broker_entries = broker.ledger(auditors["broker"], t2["txn"])
        expect("allow order:create" in map(decided, broker_entries), "no order decision at broker")
        entries = clearing.integrated(auditors["clearing"], t2["txn"], "policy:decision:allowed")
        settled = [decided(e) for e in entries]
        expect("allow settlement:submit" in settled, "no settlement decision at the clearing")
        expect(all("inclusion_proof" in e for e in entries), "entries without inclusion proofs")
        show("clearing ledger", {"entries": settled})
        print(f"\nOK: transaction {t2['txn']} ran through three deployments.", flush=True)
    except Exception:
        for d in deployments:
            print(f"\n--- {d.name} log (tail) ---\n{d.log()[-2000:]}", file=sys.stderr)
        raise
    finally:
        connections.close()
        for service in services:
            service.stop()
        for d in deployments:
            d.stop()


@contextlib.contextmanager
def workspace(path: str | None, keep: bool) -> Iterator[Path]:
    if path is not None:
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="trustplane-three-party-"))
    try:
        yield tmp
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", help="where the three data directories go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the reference services' log level (default warning)",
    )
    args = parser.parse_args()
    configure_logging(args.log_level, "console")  # the reference services' PEP log lines
    with workspace(args.workdir, args.keep) as workdir:
        try:
            run(workdir)
        except DemoFailed as exc:
            print(f"\nFAILED: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
