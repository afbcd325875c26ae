#!/usr/bin/env python3
"""JWT-bearer grant load (RFC 7523 §2.1, partner assertions) over HTTP on loopback, with the
client_credentials figure from the same run and the same server beside it as the baseline.

Starts a real `trustplane serve` (SQLite by default, PostgreSQL with --database-url), adds a partner
trust profile with `trustplane partners add`, registers a private_key_jwt client allowed both grants,
and for each repetition pre-generates one fresh client assertion AND one fresh partner assertion per
request (each sent exactly once: both jtis are single-use), then drives POST /token with wrk. A
jwt-bearer request verifies two signatures (client and partner) and consumes two jtis in the same
group commit; client_credentials verifies one. Reports requests/s, p50/p99, CPU per request.

  python bench/jwt_bearer.py                     # SQLite, 1 worker, 32 connections
  python bench/jwt_bearer.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grant_vs_cc as gvc
import token_endpoint as te

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
PARTNER_ISSUER = "https://idp.bench-partner.example"
_SIGNERS: dict[str, object] = {}
_ARGS: dict[str, str] = {}


def _init(client_pem: bytes, partner_pem: bytes, args: dict[str, str]) -> None:
    from trustplane.jose.jws import Signer

    for name, pem, kid in (("client", client_pem, "bench-key"), ("partner", partner_pem, "p1")):
        key = serialization.load_pem_private_key(pem, password=None)
        _SIGNERS[name] = Signer(key, "ES256", kid, typ="JWT")  # type: ignore[arg-type]
    _ARGS.update(args)


def _sign(name: str, claims: dict[str, object]) -> str:
    return _SIGNERS[name].sign(claims)  # type: ignore[attr-defined, no-any-return]


def _body(i: int) -> str:
    now, a = int(time.time()), _ARGS
    form = gvc.client_form(lambda claims: _sign("client", claims), a, i)
    if a["grant_type"] == JWT_BEARER:
        form["assertion"] = _sign(
            "partner",
            {
                "iss": PARTNER_ISSUER,
                "sub": f"trader-{i % 100}",
                "aud": a["issuer"],
                "iat": now,
                "exp": now + 290,
                "jti": f"{a['prefix']}-p{i}",
                "desk": "rates-emea",
            },
        )
    return urlencode(form)


def make_bodies(path: Path, n: int, pems: tuple[bytes, bytes], args: dict[str, str]) -> None:
    args = {**args, "prefix": uuid.uuid4().hex[:12]}
    with mp.Pool(os.cpu_count() or 1, initializer=_init, initargs=(*pems, args)) as pool:
        lines = pool.map(_body, range(n), chunksize=2000)
    path.write_text("\n".join(lines) + "\n")


def write_bodies(path: Path, n: int, grant_type: str, ctx: dict[str, Any]) -> None:
    args = {"client_id": ctx["client_id"], "issuer": ctx["issuer"], "grant_type": grant_type}
    make_bodies(path, n, ctx["secrets"], args)


def partner_profile(public_jwk: dict[str, object]) -> dict[str, object]:
    return {
        "partner_id": "bench-partner",
        "lei": "529900T8BM49AURSDO55",
        "issuers": [PARTNER_ISSUER],
        "keys": {"jwks": {"keys": [{**public_jwk, "kid": "p1", "alg": "ES256", "use": "sig"}]}},
        "algorithms": ["ES256"],
        "max_assertion_lifetime": 300,
        "required_claims": ["desk"],
        "claim_mappings": {"desk": "desk"},
        "allowed_scopes": ["order:create"],
        "allowed_audiences": [te.RESOURCE],
        "accepted_token_types": ["urn:ietf:params:oauth:token-type:jwt"],
        # the profile's explicit exception (the default needs a DPoP proof or a certificate): the
        # bench measures the grant against client_credentials, both without a proof, as before
        "token_binding": "bearer",
    }


def setup(env: dict[str, str], work: Path) -> tuple[str, tuple[bytes, bytes]]:
    from trustplane.keys.crypto import generate_private_key, public_jwk

    te.cli("migrate", env=env)
    te.cli("clients", "keygen", "--out", str(work / "client"), "--kid", "bench-key", env=env)
    partner_key = generate_private_key("ES256")
    (work / "partner.yaml").write_text(yaml.safe_dump(partner_profile(public_jwk(partner_key))))
    te.cli("partners", "add", str(work / "partner.yaml"), env=env)
    client = json.loads(
        te.cli(
            "clients", "add", "--lei", "5493001KJTIIGC8Y1R12", "--scope", "order:create",
            "--resource", te.RESOURCE, "--jwks-file", str(work / "client" / "jwks.json"),
            "--grant-type", "client_credentials", "--grant-type", JWT_BEARER,
            "--name", "bench", "--json", env=env,
        )
    )  # fmt: skip
    partner_pem = partner_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return client["client_id"], ((work / "client" / "key.pem").read_bytes(), partner_pem)


def main() -> None:
    gvc.run(
        gvc.arguments(__doc__),
        name="jwt_bearer",
        grant_type=JWT_BEARER,
        setup=setup,
        write_bodies=write_bodies,
    )


if __name__ == "__main__":
    main()
