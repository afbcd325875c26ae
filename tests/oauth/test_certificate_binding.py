"""RFC 8705 §3.1 ``cnf`` for a token: bound for certificate-authenticated clients and for clients
that registered ``tls_client_certificate_bound_access_tokens``; such a client without a
certificate is 400 ``invalid_request``; everybody else unbound."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import LEI
from tests.tls.pki import Pki, build_pki
from trustplane.clients.authentication import AuthenticatedClient
from trustplane.clients.model import Client, ClientStatus
from trustplane.errors import InvalidRequestError
from trustplane.oauth.certificate_binding import certificate_confirmation
from trustplane.tls import certificate_thumbprint


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


def authenticated(method: str, cert: Any, **metadata: Any) -> AuthenticatedClient:
    client = Client.build(
        "c1", {"lei": LEI, "token_endpoint_auth_method": method, **metadata}, ClientStatus.ACTIVE
    )
    return AuthenticatedClient(client, method, certificate=cert)


@pytest.mark.parametrize("method", ["tls_client_auth", "self_signed_tls_client_auth"])
def test_certificate_authenticated_clients_are_bound(pki: Pki, method: str) -> None:
    cnf = certificate_confirmation(authenticated(method, pki.client.certificate))
    assert cnf == {"x5t#S256": certificate_thumbprint(pki.client.certificate)}


def test_registered_binding_binds_a_private_key_jwt_client(pki: Pki) -> None:
    client = authenticated(
        "private_key_jwt",
        pki.self_signed.certificate,
        tls_client_certificate_bound_access_tokens=True,
    )
    assert certificate_confirmation(client) == {
        "x5t#S256": certificate_thumbprint(pki.self_signed.certificate)
    }


def test_registered_binding_without_certificate_is_invalid_request() -> None:
    client = authenticated("private_key_jwt", None, tls_client_certificate_bound_access_tokens=True)
    with pytest.raises(InvalidRequestError) as caught:
        certificate_confirmation(client)
    assert caught.value.status_code == 400
    assert caught.value.error == "invalid_request"


@pytest.mark.parametrize("flag", [None, False])
def test_other_clients_are_unbound_even_with_a_certificate(pki: Pki, flag: bool | None) -> None:
    metadata = {} if flag is None else {"tls_client_certificate_bound_access_tokens": flag}
    client = authenticated("private_key_jwt", pki.client.certificate, **metadata)
    assert certificate_confirmation(client) is None
