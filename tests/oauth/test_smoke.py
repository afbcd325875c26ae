"""A first end-to-end pass through the app in process: the rest of the suite builds on these fixtures."""

import httpx
import jwt

from tests.conftest import EXECUTION, ClientKit


async def test_client_credentials_token_verifies_with_pyjwt(
    http: httpx.AsyncClient, kit: ClientKit
) -> None:
    response = await http.post(
        "/token",
        data={
            "grant_type": "client_credentials",
            "scope": "order:create",
            "resource": EXECUTION,
            **kit.auth(),
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    jwks = (await http.get("/jwks")).json()
    header = jwt.get_unverified_header(body["access_token"])
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    claims = jwt.decode(
        body["access_token"],
        jwt.PyJWK(key).key,
        algorithms=["ES256"],
        audience=EXECUTION,
        issuer="http://127.0.0.1:8000",
    )
    assert header["typ"] == "at+jwt"
    assert claims["client_id"] == kit.client_id
    assert claims["scope"] == "order:create"
    assert response.headers["cache-control"] == "no-store"
