#!/usr/bin/env python3
"""Sender-constrained tokens: what a binding costs, printed as one table.

Sections (each a function returning rows; ``SECTIONS`` lists them in order):

- ``section_pep``: the PEP's validate + decide per request (``PolicyEnforcer.authenticate`` +
  ``authorize`` against the in-process Cedar engine, default bundle) with a Bearer token and with a
  DPoP-bound token plus a fresh proof per request (ES256 and EdDSA), the token reused as a client
  would for its lifetime. Ratio to Bearer. Target: DPoP p50 <= 500 us.
- ``section_proof``: ``DpopVerifier.verify_for_resource`` alone (parse, key from the header cache,
  signature, claims, htu normalization, ``ath``, jti into the in-memory store), per algorithm.

- ``section_issuance``: client_credentials at a real ``trustplane serve`` over HTTPS (its own TLS,
  a private CA made for the run, SQLite), one keep-alive connection per row, the rows interleaved in
  batches so the machine's noise hits them alike: Bearer (private_key_jwt), DPoP (the same client,
  a fresh ES256 proof per request), mTLS-bound (a private_key_jwt client registered with
  ``tls_client_certificate_bound_access_tokens``, presenting its certificate) and ``tls_client_auth``
  (the certificate is the authentication: no assertion to verify). Ratio to Bearer. Target: DPoP
  >= 0.75x Bearer. The TLS handshake is measured apart: a new connection per request (GET
  /healthz), with and without a client certificate, minus the same request on a kept-alive one.

  python bench/sender_constrained.py            # 3,000 requests per row (1,000 per issuance row)
  python bench/sender_constrained.py -n 10000
  python bench/sender_constrained.py --only issuance

Proofs are signed by PyJWT (a dev extra, as for the tests) before the clock starts: the rows measure
the server side only. Numbers
from a shared 2-vCPU machine are indicative; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trustplane.authzen.model import Entity
from trustplane.dpop import DpopVerifier, MemoryJtiStore
from trustplane.jose.jwk import thumbprint
from trustplane.jose.jws import Signer
from trustplane.keys.crypto import public_jwk
from trustplane.pep import (
    DpopBinding,
    DpopRequest,
    OutboundFetcher,
    PolicyEnforcer,
    TokenValidator,
    TrustedIssuer,
)
from trustplane.pep.binding import check_certificate_binding
from trustplane.policy.bundle import compile_bundle, default_bundle
from trustplane.policy.engine import PolicyEngine
from trustplane.tls import dev_ca
from trustplane.tls.certificates import certificate_thumbprint

ISSUER = "https://as.bench"
AUDIENCE = "https://execution.example/api"
URL = "https://execution.example/api/orders"
LEI = "5493001KJTIIGC8Y1R12"
Row = dict[str, Any]


def percentiles(samples_ns: list[int]) -> Row:
    ordered = sorted(samples_ns)
    return {
        "ops_s": 1e9 / statistics.mean(ordered),
        "p50_us": ordered[len(ordered) // 2] / 1000,
        "p99_us": ordered[int(len(ordered) * 0.99)] / 1000,
    }


async def timed(call: Callable[[Any], Awaitable[Any]], items: list[Any]) -> list[int]:
    samples = []
    for item in items:
        started = time.perf_counter_ns()
        await call(item)
        samples.append(time.perf_counter_ns() - started)
    return samples


# --------------------------------------------------------------------------- tokens and proofs


def token_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "sub": "client-1",
        "aud": AUDIENCE,
        "exp": now + 300,
        "iat": now,
        "nbf": now,
        "jti": uuid.uuid4().hex,
        "client_id": "client-1",
        "scope": "order:create",
        "lei": LEI,
        **extra,
    }


class ProofSigner:
    """A client's DPoP key; proofs signed by PyJWT (not our code)."""

    def __init__(self, alg: str) -> None:
        if alg == "ES256":
            self.key: Any = ec.generate_private_key(ec.SECP256R1())
            self.jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        elif alg == "EdDSA":
            self.key = ed25519.Ed25519PrivateKey.generate()
            self.jwk = OKPAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        else:
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.alg = alg

    def proofs(self, n: int, token: str) -> list[str]:
        ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=")
        header = {"typ": "dpop+jwt", "jwk": self.jwk}
        return [
            jwt.encode(
                {
                    "jti": uuid.uuid4().hex,
                    "htm": "POST",
                    "htu": URL,
                    "iat": int(time.time()),
                    "ath": ath.decode(),
                },
                self.key,
                algorithm=self.alg,
                headers=header,
            )
            for _ in range(n)
        ]


# --------------------------------------------------------------------------- sections


def order_request() -> tuple[Entity, dict[str, Any]]:
    owner = Entity("LegalEntity", LEI)
    account = Entity("Account", "ACC-1", {"owner": owner}, (owner,))
    instrument = Entity("Instrument", "XS1", {"instrument_class": "bond", "restricted": False})
    order = Entity("Order", "O-1", {"owner": owner, "account": account, "instrument": instrument})
    context = {
        "data_region": "eu",
        "delegation_depth": 0,
        "amount_minor": 250_000_00,
        "currency": "EUR",
        "instrument_class": "bond",
    }
    return order, context


async def _pep_rows(n: int) -> list[Row]:
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [{**public_jwk(issuer_key), "kid": "k1", "alg": "ES256", "use": "sig"}]}
    fetcher = OutboundFetcher(
        transport=httpx.MockTransport(lambda _request: httpx.Response(200, json=jwks))
    )
    validator = TokenValidator(
        audience=AUDIENCE,
        issuers=[TrustedIssuer(ISSUER, jwks_uri=f"{ISSUER}/jwks")],
        fetcher=fetcher,
    )
    engine = PolicyEngine(issuer=ISSUER, served_regions=["eu"])
    engine.activate(compile_bundle(default_bundle()))
    enforcer = PolicyEnforcer(validator, engine, realm="bench", dpop=DpopBinding())
    order, context = order_request()
    signer = Signer(issuer_key, "ES256", "k1", "at+jwt")

    async def pep(request: tuple[str, DpopRequest | None, x509.Certificate | None]) -> None:
        header, dpop, certificate = request
        token = await enforcer.authenticate(header, dpop=dpop)
        check_certificate_binding(token, certificate)  # what Pep does after authenticate (8705 §3)
        await enforcer.authorize(token, "order:create", order, context, scope="order:create")

    bearer = signer.sign(token_claims())
    cases: list[tuple[str, list[tuple[str, DpopRequest | None, x509.Certificate | None]]]] = [
        ("Bearer, token reused", [(f"Bearer {bearer}", None, None)] * n)
    ]
    for alg in ("ES256", "EdDSA"):
        client = ProofSigner(alg)
        bound = signer.sign(token_claims(cnf={"jkt": _jkt(client.jwk)}))
        requests = [
            (f"DPoP {bound}", DpopRequest("POST", URL, (proof,)), None)
            for proof in client.proofs(n, bound)
        ]
        cases.append((f"DPoP {alg}, token reused, new proof", requests))
    # RFC 8705: a certificate-bound token, the client's certificate from the connection
    certificate = dev_ca.issue(
        dev_ca.create_ca("bench CA"), dev_ca.Subject("bench-client")
    ).certificate
    mtls = signer.sign(token_claims(cnf={"x5t#S256": certificate_thumbprint(certificate)}))
    cases.append(("mTLS-bound, token reused", [(f"Bearer {mtls}", None, certificate)] * n))
    for _label, requests in cases:  # warm-up (not timed): JWKS fetch, engine and key caches
        await pep(requests[0])
    # Interleaved (one request of each case in turn), so that the machine's noise hits every row alike.
    samples: list[list[int]] = [[] for _ in cases]
    for i in range(1, n):
        for j, (_label, requests) in enumerate(cases):
            started = time.perf_counter_ns()
            await pep(requests[i])
            samples[j].append(time.perf_counter_ns() - started)
    rows = [
        {"name": f"PEP validate+decide, {label}", **percentiles(taken)}
        for (label, _requests), taken in zip(cases, samples, strict=True)
    ]
    for row in rows[1:]:
        row["note"] = f"{row['p50_us'] / rows[0]['p50_us']:.2f}x Bearer p50"
    await fetcher.aclose()
    return rows


def _jkt(jwk: dict[str, Any]) -> str:
    return thumbprint(jwk)


async def _proof_rows(n: int) -> list[Row]:
    rows: list[Row] = []
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJl"
    for alg in ("ES256", "EdDSA", "PS256"):
        client = ProofSigner(alg)
        jkt = _jkt(client.jwk)
        verifier = DpopVerifier(MemoryJtiStore(max_entries=n + 10))
        proofs = client.proofs(n + 1, token)
        await verifier.verify_for_resource([proofs[0]], "POST", URL, token, jkt)  # key cache

        async def verify(proof: str, v: DpopVerifier = verifier, k: str = jkt) -> None:
            await v.verify_for_resource([proof], "POST", URL, token, k)

        rows.append(
            {
                "name": f"proof verification alone, {alg}",
                **percentiles(await timed(verify, proofs[1:])),
            }
        )
    return rows


def section_pep(n: int) -> list[Row]:
    return asyncio.run(_pep_rows(n))


def section_proof(n: int) -> list[Row]:
    return asyncio.run(_proof_rows(n))


# --------------------------------------------------------------------------- issuance


ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
BIN = Path(sys.executable).parent


def _cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [str(BIN / "trustplane"), *args], env=env, capture_output=True, text=True, check=True
    ).stdout


def _tls_material(work: Path) -> dict[str, Path]:
    from trustplane.tls.dev_ca import Subject, create_ca, issue

    ca = create_ca("bench CA")
    server = issue(ca, Subject("127.0.0.1", ips=("127.0.0.1",)), server=True)
    client = issue(ca, Subject("bench-desk", "Bench Trading"))
    paths = {"ca": work / "ca.pem"}
    paths["ca"].write_bytes(ca.cert_pem())
    paths["server_cert"], paths["server_key"] = server.write(work, "server")
    paths["client_cert"], paths["client_key"] = client.write(work, "client")
    return paths


def _start_server(work: Path, tls: dict[str, Path]) -> tuple[subprocess.Popen[bytes], str, dict]:
    port = _free_port()
    issuer = f"https://127.0.0.1:{port}"
    env = {
        **os.environ,
        "TRUSTPLANE_DATA_DIR": str(work / "data"),
        "TRUSTPLANE_PORT": str(port),
        "TRUSTPLANE_ISSUER": issuer,
        "TRUSTPLANE_LOG_LEVEL": "warning",
        "TRUSTPLANE_KEY_ROTATION_INTERVAL": "0",
        "TRUSTPLANE_TLS_CERTIFICATE": str(tls["server_cert"]),
        "TRUSTPLANE_TLS_KEY": str(tls["server_key"]),
        "TRUSTPLANE_TLS_CLIENT_CA": str(tls["ca"]),
        "TRUSTPLANE_CLIENT_AUTH_METHODS": '["private_key_jwt", "tls_client_auth"]',
    }
    env["TRUSTPLANE_KEY_ENCRYPTION_KEY"] = _cli(env, "keys", "new-kek").strip()
    _cli(env, "migrate")
    _cli(env, "clients", "keygen", "--out", str(work / "client"), "--kid", "bench-key")
    ids: dict[str, str] = {}
    base = ["clients", "add", "--lei", LEI, "--scope", "order:create", "--resource", AUDIENCE]
    jwks = ["--jwks-file", str(work / "client" / "jwks.json")]
    ids["pkjwt"] = json.loads(_cli(env, *base, *jwks, "--json"))["client_id"]
    ids["bound"] = json.loads(_cli(env, *base, *jwks, "--certificate-bound-tokens", "--json"))[
        "client_id"
    ]
    tls_auth = [
        "--auth-method",
        "tls_client_auth",
        "--tls-subject",
        "dn=CN=bench-desk,O=Bench Trading",
    ]
    ids["tls"] = json.loads(_cli(env, *base, *tls_auth, "--json"))["client_id"]
    log = open(work / "server.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [str(BIN / "trustplane"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return proc, issuer, {"ids": ids, "key": (work / "client" / "key.pem").read_bytes()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ssl(tls: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls["ca"]))
    if with_cert:
        ctx.load_cert_chain(str(tls["client_cert"]), str(tls["client_key"]))
    return ctx


def _wait_healthy(url: str, ctx: ssl.SSLContext, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("trustplane serve exited; see its log")
        try:
            if httpx.get(f"{url}/healthz", verify=ctx, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("trustplane serve did not become healthy")


def _forms(issuer: str, client_id: str, pem: bytes | None, n: int) -> list[dict[str, str]]:
    """Pre-signed client_credentials forms (one fresh client assertion each)."""
    from cryptography.hazmat.primitives import serialization

    forms = []
    key = serialization.load_pem_private_key(pem, password=None) if pem else None
    for _ in range(n):
        form = {"grant_type": "client_credentials", "scope": "order:create", "resource": AUDIENCE}
        if key is None:
            form["client_id"] = client_id
        else:
            now = int(time.time())
            claims = {"iss": client_id, "sub": client_id, "aud": issuer, "iat": now,
                      "exp": now + 120, "jti": uuid.uuid4().hex}  # fmt: skip
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = jwt.encode(
                claims, key, algorithm="ES256", headers={"kid": "bench-key"}
            )
        forms.append(form)
    return forms


def _issuance_rows(n: int) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="tp-bench-sc-"))
    tls = _tls_material(work)
    proc, issuer, setup = _start_server(work, tls)
    ids, pem = setup["ids"], setup["key"]
    token_url = f"{issuer}/token"
    try:
        _wait_healthy(issuer, _ssl(tls, False), proc)
        time.sleep(1.5)  # the server's client registry refresh has the CLI's clients by now
        prover = ProofSigner("ES256")
        header = {"typ": "dpop+jwt", "jwk": prover.jwk}

        def proofs(count: int) -> list[dict[str, str]]:
            return [
                {"DPoP": jwt.encode(
                    {"jti": uuid.uuid4().hex, "htm": "POST", "htu": token_url,
                     "iat": int(time.time())},
                    prover.key, algorithm="ES256", headers=header,
                )}
                for _ in range(count)
            ]  # fmt: skip

        rows_spec = [
            ("Bearer (private_key_jwt)", ids["pkjwt"], pem, False, False),
            ("DPoP ES256 (private_key_jwt + proof)", ids["pkjwt"], pem, False, True),
            ("mTLS-bound (private_key_jwt + cert)", ids["bound"], pem, True, False),
            ("mTLS tls_client_auth (cert only)", ids["tls"], None, True, False),
        ]
        rows = asyncio.run(_drive(token_url, tls, rows_spec, issuer, proofs, n))
        rows += _handshake_rows(issuer, tls, max(100, n // 10))
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


CONCURRENCY = 16
Spec = tuple[str, str, bytes | None, bool, bool]


async def _drive(
    token_url: str,
    tls: dict[str, Path],
    rows_spec: list[Spec],
    issuer: str,
    proofs: Callable[[int], list[dict[str, str]]],
    n: int,
) -> list[Row]:
    """Each row: ``CONCURRENCY`` requests in flight over a pool of kept-alive connections; the rows
    take turns by batch (the first batch of each warms up and is discarded). Rate = requests /
    wall time of the row's batches; latency percentiles per request."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    clients = [
        httpx.AsyncClient(verify=_ssl(tls, cert), timeout=30, limits=limits)
        for _l, _c, _p, cert, _d in rows_spec
    ]
    samples: list[list[int]] = [[] for _ in rows_spec]
    wall = [0] * len(rows_spec)
    batch = 200
    for start in range(0, n + batch, batch):
        for j, (label, client_id, key, _cert, dpop) in enumerate(rows_spec):
            forms = _forms(issuer, client_id, key, batch)
            headers = proofs(batch) if dpop else [{}] * batch
            queue = list(zip(forms, headers, strict=True))
            taken: list[int] = []

            async def worker(
                client: httpx.AsyncClient = clients[j],
                row: str = label,
                queue: list[tuple[dict[str, str], dict[str, str]]] = queue,
                taken: list[int] = taken,
            ) -> None:
                while queue:
                    form, extra = queue.pop()
                    began = time.perf_counter_ns()
                    response = await client.post(token_url, data=form, headers=extra)
                    taken.append(time.perf_counter_ns() - began)
                    if response.status_code != 200:
                        raise SystemExit(f"{row}: {response.status_code} {response.text}")

            began = time.perf_counter_ns()
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            if start:
                wall[j] += time.perf_counter_ns() - began
                samples[j] += taken
    for client in clients:
        await client.aclose()
    rows: list[Row] = []
    for (label, *_rest), taken, ns in zip(rows_spec, samples, wall, strict=True):
        row = {"name": f"issue client_credentials, {label}", **percentiles(taken)}
        row["ops_s"] = len(taken) / (ns / 1e9)
        rows.append(row)
    for row in rows[1:]:
        row["note"] = f"{row['ops_s'] / rows[0]['ops_s']:.2f}x Bearer rate"
    return rows


def _handshake_rows(issuer: str, tls: dict[str, Path], n: int) -> list[Row]:
    """A new TLS connection per request (GET /healthz) minus a kept-alive one: the handshake."""
    url = f"{issuer}/healthz"
    kept = httpx.Client(verify=_ssl(tls, False), timeout=10)
    kept.get(url)
    base = [_time(lambda: kept.get(url)) for _ in range(n)]
    kept.close()
    rows = []
    for label, cert in (("server certificate only", False), ("with client certificate", True)):
        ctx = _ssl(tls, cert)

        def fresh(c: ssl.SSLContext = ctx) -> None:
            with httpx.Client(verify=c, timeout=10) as client:
                client.get(url)

        taken = [_time(fresh) for _ in range(n)]
        row = {"name": f"TLS handshake + request, {label}", **percentiles(taken)}
        extra = (sorted(taken)[len(taken) // 2] - sorted(base)[len(base) // 2]) / 1000
        row["note"] = f"handshake ~{extra:.0f} us p50 over a kept-alive request"
        rows.append(row)
    return rows


def _time(call: Callable[[], Any]) -> int:
    began = time.perf_counter_ns()
    call()
    return time.perf_counter_ns() - began


def section_issuance(n: int) -> list[Row]:
    return _issuance_rows(max(200, n // 3))


SECTIONS = (section_pep, section_proof, section_issuance)


def print_rows(rows: list[Row]) -> None:
    print(f"{'benchmark':<56} {'ops/s':>10} {'p50 us':>9} {'p99 us':>9}  note")
    for row in rows:
        print(
            f"{row['name']:<56} {row['ops_s']:>10.0f} {row['p50_us']:>9.1f} "
            f"{row['p99_us']:>9.1f}  {row.get('note', '')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="requests per row")
    parser.add_argument("--only", choices=["pep", "proof", "issuance"], help="run one section only")
    args = parser.parse_args()
    rows: list[Row] = []
    for section in SECTIONS:
        if args.only is None or section.__name__ == f"section_{args.only}":
            rows += section(args.n)
    print_rows(rows)


if __name__ == "__main__":
    main()
