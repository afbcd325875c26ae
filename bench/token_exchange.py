#!/usr/bin/env python3
"""Token exchange (RFC 8693) load over HTTP on loopback, with the client_credentials figure from the
same run and the same server beside it as the baseline.

Starts a real `trustplane serve` (SQLite by default, PostgreSQL with --database-url), registers a
private_key_jwt client allowed client_credentials and token-exchange, and for each repetition
pre-mints subject tokens (our own access tokens, obtained by client_credentials from the server
before the timed part) and pre-generates one fresh client assertion per request (single-use jti).
An exchange verifies two signatures (client assertion and subject token), reads the revocation
table, asks the PDP (token:exchange), signs, and records issuance + decision in one group commit.
Reports exchanges/s, p50/p99, CPU per request. Target: >= 800 exchanges/s on one worker.

  python bench/token_exchange.py                     # SQLite, 1 worker, 32 connections
  python bench/token_exchange.py --database-url postgresql://postgres@127.0.0.1:5432/test
  python bench/token_exchange.py --subject-tokens 6000   # (nearly) every subject token new

Subject tokens are used in turn (request i presents token i mod --subject-tokens): with the default
256 each is presented many times in a repetition, so the server's verified subject-token cache
(oauth/exchange/verified.py) answers nearly every signature check after the first 256; with more
tokens than a repetition's requests every exchange verifies its subject token in full.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grant_vs_cc as gvc
import token_endpoint as te

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKENS = [256]
_SIGNERS: dict[str, object] = {}
_ARGS: dict[str, str] = {}
_SUBJECTS: list[str] = []


def _init(client_pem: bytes, args: dict[str, str], subjects: list[str]) -> None:
    from trustplane.jose.jws import Signer

    key = serialization.load_pem_private_key(client_pem, password=None)
    _SIGNERS["client"] = Signer(key, "ES256", "bench-key", typ="JWT")  # type: ignore[arg-type]
    _ARGS.update(args)
    _SUBJECTS[:] = subjects


def _sign(name: str, claims: dict[str, object]) -> str:
    return _SIGNERS[name].sign(claims)  # type: ignore[attr-defined, no-any-return]


def _body(i: int) -> str:
    a = _ARGS
    form = gvc.client_form(lambda claims: _sign("client", claims), a, i)
    if a["grant_type"] == EXCHANGE:
        form["subject_token"] = _SUBJECTS[i % len(_SUBJECTS)]
        form["subject_token_type"] = ACCESS_TOKEN
    return urlencode(form)


def subject_tokens(pem: bytes, client_id: str, issuer: str, n: int) -> list[str]:
    """Fresh subject tokens, minted by the server (client_credentials) before the timed part."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from trustplane.pep import PrivateKeyJwt

    key = serialization.load_pem_private_key(pem, password=None)
    auth = PrivateKeyJwt(client_id, key, "bench-key", issuer)  # type: ignore[arg-type]

    def mint(http: httpx.Client) -> str:
        form = {"grant_type": "client_credentials", "scope": "order:create"}
        form["resource"] = te.RESOURCE
        headers: dict[str, str] = {}
        auth.apply(form, headers)
        response = http.post(f"{issuer}/token", data=form, headers=headers)
        response.raise_for_status()
        return str(response.json()["access_token"])

    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: mint(http), range(n)))


def make_bodies(path: Path, n: int, pem: bytes, args: dict[str, str], subjects: list[str]) -> None:
    args = {**args, "prefix": uuid.uuid4().hex[:12]}
    with mp.Pool(os.cpu_count() or 1, initializer=_init, initargs=(pem, args, subjects)) as pool:
        lines = pool.map(_body, range(n), chunksize=2000)
    path.write_text("\n".join(lines) + "\n")


def write_bodies(path: Path, n: int, grant_type: str, ctx: dict[str, Any]) -> None:
    """Client-credentials bodies, or exchange bodies over subject tokens minted just before."""
    args = {"client_id": ctx["client_id"], "issuer": ctx["issuer"], "grant_type": grant_type}
    pem = ctx["secrets"]
    subjects = (
        subject_tokens(pem, args["client_id"], args["issuer"], SUBJECT_TOKENS[0])
        if grant_type == EXCHANGE
        else []
    )
    make_bodies(path, n, pem, args, subjects)


def setup(env: dict[str, str], work: Path) -> tuple[str, bytes]:
    te.cli("migrate", env=env)
    te.cli("clients", "keygen", "--out", str(work / "client"), "--kid", "bench-key", env=env)
    client = json.loads(
        te.cli(
            "clients", "add", "--lei", "5493001KJTIIGC8Y1R12", "--scope", "order:create",
            "--resource", te.RESOURCE, "--jwks-file", str(work / "client" / "jwks.json"),
            "--grant-type", "client_credentials", "--grant-type", EXCHANGE,
            "--name", "bench", "--json", env=env,
        )
    )  # fmt: skip
    return client["client_id"], (work / "client" / "key.pem").read_bytes()


def main() -> None:
    def extra(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--subject-tokens", type=int, default=SUBJECT_TOKENS[0])

    args = gvc.arguments(__doc__, extra)
    SUBJECT_TOKENS[0] = args.subject_tokens
    gvc.run(
        args,
        name="token_exchange",
        grant_type=EXCHANGE,
        setup=setup,
        write_bodies=write_bodies,
    )


if __name__ == "__main__":
    main()
