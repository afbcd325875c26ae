"""Interop with a client nobody on the team wrote: npm ``openid-client`` 6 runs the whole code flow
against a live ``trustplane serve`` under ``profile = "fapi2"`` (so every profile rule meets a foreign
client): RFC 8414 discovery, PAR (RFC 9126) with private_key_jwt, PKCE S256, DPoP (RFC 9449) at /par
and /token, the code grant, a refresh, and a DPoP-protected request (``fetchProtectedResource``) to a
resource server guarded by the PEP SDK. httpx is the user agent between (login and consent).

The script is tests/e2e/interop/openid_client_flow.mjs. openid-client comes from npm into a cache
outside the repository (``$XDG_CACHE_HOME`` or ``~/.cache``, ``trustplane-tests``), like axe-core in
test_console_browser.py; without node, npm or the registry the test is skipped with the reason (in CI,
.ci/run installs it first, and a missing client fails the test).

Conformance-suite counterparts: ``fapi2-security-profile-final-happy-flow`` (DPoP, private_key_jwt
variant), ``...-refresh-token``, ``...-ensure-holder-of-key-required``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.authorize.flow import REDIRECT_URI
from tests.conftest import EXECUTION, free_port, jwks_for, new_ec_key, wait_until
from tests.e2e.conftest import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    LiveServer,
    _die_with_parent,
    running_servers,
)
from tests.e2e.test_authorization_flow import Callback, add_user, approve, user_agent
from tests.e2e.test_fapi2_flow import register

pytestmark = pytest.mark.e2e

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trustplane-tests"
REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "interop" / "openid_client_flow.mjs"
STEP_TIMEOUT = 60.0


def _unavailable(reason: str) -> None:
    """In CI (.ci/run installs openid-client first) a missing client is a failure, elsewhere a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def openid_client_dir() -> Path:
    """The npm prefix holding openid-client 6 (installed on first use), or skip with the reason."""
    installed = CACHE / "node_modules" / "openid-client" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"].startswith("6."):
        return CACHE
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("the openid-client interop test needs node and npm (not installed)")
    assert npm is not None
    try:
        proc = subprocess.run(
            [
                npm,
                "install",
                "--silent",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(CACHE),
                "openid-client@6",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _unavailable("openid-client could not be installed from npm: timed out after 180 s")
        raise
    if proc.returncode != 0:
        _unavailable(f"openid-client could not be installed from npm: {proc.stderr.strip()[:300]}")
    return CACHE


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_servers(tmp_path_factory.mktemp("interop")) as servers:
        started = servers.start(profile="fapi2")
        add_user(started, "alice")
        yield started


@pytest.fixture(scope="module")
def resource_server(server: LiveServer) -> Iterator[str]:
    """tests/e2e/interop/pep_app.py in its own uvicorn process, trusting the live issuer."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.e2e.interop.pep_app:from_env",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**os.environ, "TP_ISSUER": server.issuer},
        cwd=REPO,
        preexec_fn=_die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), START_TIMEOUT, "the PEP resource server to start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def read_message(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=STEP_TIMEOUT)
        raise AssertionError(
            f"openid-client script ended: {proc.stderr.read() if proc.stderr else ''}"
        )
    message: dict[str, Any] = json.loads(line)
    assert "error" not in message, message
    return message


def test_openid_client_code_flow_par_dpop_private_key_jwt(
    server: LiveServer, resource_server: str
) -> None:
    prefix = openid_client_dir()
    key = new_ec_key()
    registered = register(server, jwks=jwks_for(key))
    assert registered.status_code == 201, registered.text
    client_id = registered.json()["client_id"]
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    kid = jwks_for(key)["keys"][0]["kid"]
    env = {
        **os.environ,
        "TP_ISSUER": server.issuer,
        "TP_CLIENT_ID": client_id,
        "TP_CLIENT_KEY": pem,
        "TP_KID": kid,
        "TP_REDIRECT_URI": REDIRECT_URI,
        "TP_SCOPE": "order:create",
        "TP_RESOURCE": EXECUTION,
        "TP_RS_URL": f"{resource_server}/orders/42",
    }
    # ESM resolves packages next to the script (NODE_PATH does not apply): run a copy in the prefix
    script = prefix / SCRIPT.name
    shutil.copyfile(SCRIPT, script)
    with subprocess.Popen(
        ["node", str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=prefix,
    ) as proc:
        try:
            authorize = read_message(proc)["authorize"]
            # openid-client pushed the request: the browser only carries client_id and request_uri
            assert set(httpx.URL(authorize).params) == {"client_id", "request_uri"}
            callback = Callback()
            with user_agent(server, callback) as agent:
                assert approve(agent, authorize, "alice").status_code == 200
            assert proc.stdin is not None
            proc.stdin.write(f"{callback.hits[-1]}\n")
            proc.stdin.flush()
            result = read_message(proc)["result"]
            assert proc.wait(timeout=STEP_TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    assert result["par_endpoint"] == f"{server.issuer}/par"
    # RFC 9449 §5 / §6.1: DPoP-bound, before and after the refresh, to the same key
    assert result["token_type"].lower() == "dpop"
    assert set(result["cnf"]) == {"jkt"}
    assert result["refreshed_token_type"].lower() == "dpop"
    assert result["refreshed_cnf"] == result["cnf"]
    # the PEP accepted openid-client's DPoP request
    assert result["resource_status"] == 200
    assert result["resource_body"] == {"order": "42", "client": client_id}

    # ... and refuses the same token as a bearer token (RFC 9449 §7.1)
    token = result["refreshed_access_token"]
    as_bearer = httpx.get(
        f"{resource_server}/orders/42", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert as_bearer.status_code == 401
    assert as_bearer.json()["error"] == "invalid_token"
    assert "WWW-Authenticate" in as_bearer.headers
