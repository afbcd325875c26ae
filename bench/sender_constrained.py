#!/usr/bin/env python3
"""Sender-constrained tokens: what a binding costs, printed as one table.

Sections (each a function returning rows; ``SECTIONS`` lists them in order):

- ``section_pep``: the PEP's validate + decide per request (``PolicyEnforcer.authenticate`` +
  ``authorize`` against the in-process Cedar engine, default bundle) with a Bearer token and with a
  DPoP-bound token plus a fresh proof per request (ES256 and EdDSA), the token reused as a client
  would for its lifetime. Ratio to Bearer. Target: DPoP p50 <= 500 us.
- ``section_proof``: ``DpopVerifier.verify_for_resource`` alone (parse, key from the header cache,
  signature, claims, htu normalization, ``ath``, jti into the in-memory store), per algorithm.

Issuance rows (client_credentials with Bearer, DPoP and mTLS over keep-alive, TLS handshake apart)
belong here as a third section once the token endpoint issues bound tokens (issue 13).

  python bench/sender_constrained.py            # 3,000 requests per row
  python bench/sender_constrained.py -n 10000

Proofs are signed by PyJWT (a dev extra, as for the tests) before the clock starts: the rows measure
the server side only. Numbers
from a shared 2-vCPU machine are indicative; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
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
from trustplane.policy.bundle import compile_bundle, default_bundle
from trustplane.policy.engine import PolicyEngine

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

    async def pep(request: tuple[str, DpopRequest | None]) -> None:
        header, dpop = request
        token = await enforcer.authenticate(header, dpop=dpop)
        await enforcer.authorize(token, "order:create", order, context, scope="order:create")

    bearer = signer.sign(token_claims())
    cases: list[tuple[str, list[tuple[str, DpopRequest | None]]]] = [
        ("Bearer, token reused", [(f"Bearer {bearer}", None)] * n)
    ]
    for alg in ("ES256", "EdDSA"):
        client = ProofSigner(alg)
        bound = signer.sign(token_claims(cnf={"jkt": _jkt(client.jwk)}))
        requests = [
            (f"DPoP {bound}", DpopRequest("POST", URL, (proof,)))
            for proof in client.proofs(n, bound)
        ]
        cases.append((f"DPoP {alg}, token reused, new proof", requests))
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


SECTIONS = (section_pep, section_proof)


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
    args = parser.parse_args()
    rows: list[Row] = []
    for section in SECTIONS:
        rows += section(args.n)
    print_rows(rows)


if __name__ == "__main__":
    main()
