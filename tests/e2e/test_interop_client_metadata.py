"""Client metadata that foreign clients and operators set: RFC 9449 §5.2 ``dpop_bound_access_tokens``
(``trustplane clients add --dpop-bound`` or RFC 7591 registration) and ``trustplane clients add
--profile fapi2`` (a client held to the FAPI 2.0 profile on a default deployment), against a live
``trustplane serve``. Every refusal asserts status and exact error.

Conformance-suite counterparts: ``fapi2-security-profile-final-ensure-holder-of-key-required``
(DPoP variant: a token request without a DPoP header), ``oidcc-registration-*`` (metadata types).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key, wait_until
from tests.dpop.conftest import ProofKey
from tests.e2e.conftest import (
    CLI_TIMEOUT,
    PROPAGATION_TIMEOUT,
    TRUSTPLANE,
    LiveServer,
    knows_client,
    running_servers,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_servers(tmp_path_factory.mktemp("interop-metadata")) as servers:
        # client_secret_basic enabled, so its refusal below is the profile's, not the deployment's
        yield servers.start(client_auth_methods='["private_key_jwt", "client_secret_basic"]')


def clients_add(server: LiveServer, *flags: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """``trustplane clients add --json FLAGS`` for a new private_key_jwt client: (process, kit|None)."""
    key = new_ec_key()
    jwks_file = Path(server.env["TRUSTPLANE_DATA_DIR"]) / f"jwks-{time.monotonic_ns()}.json"
    jwks_file.write_text(json.dumps(jwks_for(key)))
    proc = subprocess.run(
        [
            TRUSTPLANE,
            "clients",
            "add",
            "--json",
            "--lei",
            LEI,
            "--scope",
            "order:create",
            "--resource",
            EXECUTION,
            "--jwks-file",
            str(jwks_file),
            *flags,
        ],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        return proc, None
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kit = ClientKit(json.loads(proc.stdout)["client_id"], key, server.issuer, pem=pem)
    wait_until(lambda: knows_client(server, kit), PROPAGATION_TIMEOUT, "the server to load it")
    return proc, kit


def token(server: LiveServer, kit: ClientKit, proof: ProofKey | None = None) -> httpx.Response:
    headers = {} if proof is None else {"DPoP": proof.proof(htu=f"{server.issuer}/token")}
    data = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}
    return httpx.post(
        f"{server.base_url}/token", data={**data, **kit.auth()}, headers=headers, timeout=10
    )


def test_dpop_bound_client_needs_a_proof_on_every_token_request(server: LiveServer) -> None:
    proc, kit = clients_add(server, "--dpop-bound")
    assert json.loads(proc.stdout)["dpop_bound_access_tokens"] is True
    # RFC 9449 §5.2: "the authorization server MUST reject token requests from this client that do
    # not contain the DPoP header"
    refused = token(server, kit)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_dpop_proof")
    assert "dpop_bound_access_tokens" in refused.json()["error_description"]
    key = ProofKey.generate()
    issued = token(server, kit, key)
    assert issued.status_code == 200, issued.text
    assert issued.json()["token_type"] == "DPoP"
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": key.jkt}


def test_without_the_flag_a_proof_stays_optional(server: LiveServer) -> None:
    _, kit = clients_add(server)
    plain = token(server, kit)
    assert (plain.status_code, plain.json()["token_type"]) == (200, "Bearer")


def register(server: LiveServer, **extra: Any) -> httpx.Response:
    initial = server.cli_json("registration-token", "create", "--lei", LEI)["initial_access_token"]
    body = {
        "client_name": "foreign client",
        "lei": LEI,
        "scope": "order:create",
        "allowed_resources": [EXECUTION],
        "jwks": jwks_for(new_ec_key()),
        **extra,
    }
    return httpx.post(
        f"{server.base_url}/register",
        json=body,
        headers={"Authorization": f"Bearer {initial}"},
        timeout=10,
    )


def test_registration_accepts_dpop_bound_access_tokens(server: LiveServer) -> None:
    registered = register(server, dpop_bound_access_tokens=True)
    assert registered.status_code == 201, registered.text
    assert registered.json()["dpop_bound_access_tokens"] is True
    # RFC 7591 §2: a boolean member; anything else is invalid metadata
    bad = register(server, dpop_bound_access_tokens="sometimes")
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_client_metadata")
    assert "dpop_bound_access_tokens" in bad.json()["error_description"]


def test_profile_fapi2_from_the_cli(server: LiveServer) -> None:
    proc, kit = clients_add(server, "--profile", "fapi2")
    assert json.loads(proc.stdout)["profile"] == "fapi2"
    # FAPI 2.0 §5.3.2.1: only sender-constrained tokens (trustplane's sender_constraint_required)
    refused = token(server, kit)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_request")
    assert "sender-constrained" in refused.json()["error_description"]
    issued = token(server, kit, ProofKey.generate())
    assert (issued.status_code, issued.json()["token_type"]) == (200, "DPoP")


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        # FAPI 2.0 §5.3.2.1: private_key_jwt or mTLS client authentication only
        (("--profile", "fapi2", "--auth-method", "client_secret_basic"), "under the fapi2 profile"),
        (("--profile", "fapi3"), "profile"),
    ],
)
def test_profile_refusals_from_the_cli(
    server: LiveServer, flags: tuple[str, ...], reason: str
) -> None:
    proc, kit = clients_add(server, *flags)
    assert kit is None
    assert proc.returncode == 1
    assert "trustplane: invalid_client_metadata:" in proc.stderr
    assert reason in proc.stderr
