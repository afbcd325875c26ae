"""The floor to compare the token endpoint with, run by bench/token_endpoint.py in the same script.

A bare Starlette handler doing only the unavoidable work of a private_key_jwt client_credentials
request: parse the form, verify the ES256 client assertion, sign an ES256 access token. No database,
no replay store, no audit, no policy. ``trustplane / baseline`` says what everything else costs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import parse_qsl

import orjson
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from trustplane.jose.jws import Signer, parse
from trustplane.keys.crypto import generate_private_key
from trustplane.protocol.tokens import new_jti

_public = serialization.load_pem_public_key(Path(os.environ["BASELINE_CLIENT_PUB"]).read_bytes())
_signer = Signer(generate_private_key("ES256"), "ES256", "baseline", typ="at+jwt")


async def token(request: Request) -> Response:
    form = dict(parse_qsl((await request.body()).decode()))
    jws = parse(form["client_assertion"])
    if not jws.verify(_public):  # type: ignore[arg-type]
        return Response(b'{"error":"invalid_client"}', 401, media_type="application/json")
    claims = jws.claims()
    now = int(time.time())
    access = _signer.sign(
        {
            "iss": "baseline",
            "sub": claims["sub"],
            "aud": form.get("resource"),
            "exp": now + 300,
            "iat": now,
            "jti": new_jti(),
            "scope": form.get("scope"),
        }
    )
    body = {"access_token": access, "token_type": "Bearer", "expires_in": 300}
    return Response(
        orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"}
    )


app = Starlette(routes=[Route("/token", token, methods=["POST"])])
