"""``self_signed_tls_client_auth`` with a ``jwks_uri``: a certificate whose key is not in the cached
JWKS (the client rotated it) refetches the set like an unknown ``kid`` does, at most once per
``min_refetch``; a key that is not there after the refetch is ``invalid_client``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import EXECUTION, LEI, make_settings
from tests.tls.pki import public_jwks
from trustplane.clients.authentication import ClientAuthenticator
from trustplane.clients.model import Client, ClientStatus
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.errors import InvalidClientError
from trustplane.protocol.form import Form
from trustplane.tls.dev_ca import Issued, Subject, self_signed

JWKS_URI = "https://keys.desk-7.example/jwks"


@dataclass
class Jwks:
    served: Issued
    fetches: int = 0

    def handler(self, _request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        return httpx.Response(200, json=public_jwks(self.served.key))


@dataclass
class Registry:
    clients: dict[str, Client] = field(default_factory=dict)

    def get(self, client_id: str) -> Client | None:
        return self.clients.get(client_id)


def authenticator(tmp_path: Path, jwks: Jwks, min_refetch: float) -> ClientAuthenticator:
    settings = make_settings(
        "sqlite+aiosqlite:///:memory:",
        tmp_path,
        client_auth_methods=("private_key_jwt", "self_signed_tls_client_auth"),
        tls_client_cert_header="x-client-cert",
        trusted_proxies=("10.0.0.0/8",),
    )
    metadata: dict[str, Any] = {
        "lei": LEI,
        "token_endpoint_auth_method": "self_signed_tls_client_auth",
        "jwks_uri": JWKS_URI,
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
    }
    registry = Registry({"desk-7": Client.build("desk-7", metadata, ClientStatus.ACTIVE)})
    remote = RemoteJwksCache(min_refetch=min_refetch, transport=httpx.MockTransport(jwks.handler))
    return ClientAuthenticator(settings, registry, None, remote)  # type: ignore[arg-type]


FORM = Form({"client_id": "desk-7"}, {})


async def test_rotated_certificate_refetches_the_jwks(tmp_path: Path) -> None:
    first, second = self_signed(Subject("desk-7")), self_signed(Subject("desk-7"))
    jwks = Jwks(first)
    auth = authenticator(tmp_path, jwks, min_refetch=0)

    assert (await auth.authenticate(FORM, None, certificate=first.certificate)).client
    jwks.served = second  # the client publishes its new key, then uses the new certificate
    result = await auth.authenticate(FORM, None, certificate=second.certificate)

    assert result.method == "self_signed_tls_client_auth"
    assert result.certificate == second.certificate
    assert jwks.fetches == 2


async def test_unknown_key_after_the_refetch_is_invalid_client(tmp_path: Path) -> None:
    jwks = Jwks(self_signed(Subject("desk-7")))
    auth = authenticator(tmp_path, jwks, min_refetch=0)

    with pytest.raises(InvalidClientError):
        await auth.authenticate(FORM, None, certificate=self_signed(Subject("x")).certificate)
    assert jwks.fetches == 2  # the cached set, then one refetch


async def test_refetches_are_bounded_by_min_refetch(tmp_path: Path) -> None:
    first = self_signed(Subject("desk-7"))
    jwks = Jwks(first)
    auth = authenticator(tmp_path, jwks, min_refetch=60)
    await auth.authenticate(FORM, None, certificate=first.certificate)

    for _ in range(5):
        with pytest.raises(InvalidClientError) as caught:
            await auth.authenticate(FORM, None, certificate=self_signed(Subject("x")).certificate)
        assert caught.value.status_code == 401
    assert jwks.fetches == 1
