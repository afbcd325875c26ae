"""``par_lifetime`` bounds at load, and the ``trustplane clients add`` PAR/JAR flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.authorize.flow import REDIRECT_URI
from tests.cli.conftest import invoke
from tests.conftest import EXECUTION, KEK, LEI, jwks_for, new_ec_key
from trustplane.settings import SettingsError, load_settings


@pytest.mark.parametrize(("value", "ok"), [(5, True), (600, True), (601, False), (4, False)])
def test_par_lifetime_bounds(value: int, ok: bool) -> None:
    if ok:
        assert load_settings(par_lifetime=value).par_lifetime == value
        return
    with pytest.raises(SettingsError) as caught:
        load_settings(par_lifetime=value)
    assert str(caught.value).startswith("invalid setting TRUSTPLANE_PAR_LIFETIME: ")
    assert caught.value.setting == "par_lifetime"


def test_clients_add_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_for(new_ec_key())))
    env = {"TRUSTPLANE_KEY_ENCRYPTION_KEY": KEK}
    assert invoke(tmp_path, "migrate", monkeypatch=monkeypatch, **env).returncode == 0
    common = [
        "clients", "add", "--lei", LEI, "--scope", "order:create", "--resource", EXECUTION,
        "--grant-type", "authorization_code", "--redirect-uri", REDIRECT_URI,
        "--jwks-file", str(jwks), "--json",
    ]  # fmt: skip
    added = invoke(
        tmp_path,
        *common,
        "--require-par",
        "--require-signed-request-object",
        "--request-object-signing-alg",
        "ES256",
        monkeypatch=monkeypatch,
        **env,
    )
    assert added.returncode == 0, added.stderr
    body = json.loads(added.stdout)
    assert body["require_pushed_authorization_requests"] is True
    assert body["require_signed_request_object"] is True
    assert body["request_object_signing_alg"] == "ES256"
    plain = json.loads(invoke(tmp_path, *common, monkeypatch=monkeypatch, **env).stdout)
    assert "require_pushed_authorization_requests" not in plain
    refused = invoke(
        tmp_path, *common, "--request-object-signing-alg", "HS256", monkeypatch=monkeypatch, **env
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "trustplane: invalid_client_metadata: request_object_signing_alg 'HS256' is not allowed "
        "here (allowed: ES256, EdDSA, PS256)"
    )
