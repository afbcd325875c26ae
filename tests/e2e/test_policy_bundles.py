"""Policy bundles across processes: the CLI publishes and activates a bundle, every running server
enforces it at the token endpoint within the refresh interval, and a rollback undoes it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import EXECUTION, ClientKit
from tests.e2e.conftest import (
    PROPAGATION_TIMEOUT,
    LiveServer,
    LiveServers,
    register_client,
    wait_until,
)
from trustplane.policy.bundle import default_bundle

pytestmark = pytest.mark.e2e

FREEZE = (
    '@id("token.freeze_cancels")\nforbid (principal, action == Action::"token:obtain", resource)\n'
    'when { resource.name == "order:cancel" };\n'
)


def token(server: LiveServer, kit: ClientKit, scope: str) -> httpx.Response:
    data = {"grant_type": "client_credentials", "scope": scope, "resource": EXECUTION, **kit.auth()}
    return httpx.post(f"{server.base_url}/token", data=data, timeout=10.0)


def frozen_bundle(root: Path) -> Path:
    files = dict(default_bundle().files)
    files["freeze.cedar"] = FREEZE
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def cancel_status(server: LiveServer, kit: ClientKit) -> int:
    return token(server, kit, "order:cancel").status_code


@pytest.mark.postgres
def test_activation_and_rollback_reach_every_server(
    live_server: LiveServers, pg_url: str, tmp_path: Path
) -> None:
    a, b = live_server.start_cluster(2, pg_url)
    kit = register_client(a, b)
    assert cancel_status(b, kit) == 200

    published = a.cli_json(
        "policy",
        "publish",
        str(frozen_bundle(tmp_path / "freeze")),
        "--change-ref",
        "CR-1042",
        "--author",
        "alice",
        "--activate",
    )
    assert published["activated"] is True
    wait_until(lambda: cancel_status(b, kit) == 400, PROPAGATION_TIMEOUT, "server B to enforce")
    refused = token(a, kit, "order:cancel")
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_scope")
    assert token(b, kit, "order:create").status_code == 200

    listing = b.cli_json("policy", "list")
    assert listing["bundles"][0]["change_ref"] == "CR-1042"

    a.cli("policy", "rollback", "--actor", "bob", "--change-ref", "INC-9")
    wait_until(lambda: cancel_status(b, kit) == 200, PROPAGATION_TIMEOUT, "server B to roll back")
    assert cancel_status(a, kit) == 200


def test_first_start_activates_the_builtin_bundle(live_server: LiveServers) -> None:
    server = live_server.start()
    listing = server.cli_json("policy", "list")
    assert [(b["version"], b["status"], b["change_ref"]) for b in listing["bundles"]] == [
        (default_bundle().version, "active", "builtin")
    ]
