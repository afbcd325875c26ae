"""Three real deployments linked by token exchange and the Shared Signals Framework (push), shared by
``tests/e2e/test_ssf.py`` and ``bench/lifecycle.py``.

A (the arranger) issues a token; B (the broker) trusts A by a trust profile with an ``ssf`` member
and exchanges A's token for its own (RFC 8693); C (the clearing) trusts B the same way and exchanges
B's token. Each receiver subscribes itself to its partner's transmitter (a push stream, RFC 8935),
with a token the partner issues to its client there (private_key_jwt by its own signing key, which
the partner knows from its jwks_uri). :func:`start_chain` starts the three and waits until a
revocation at A reaches C; :meth:`SsfChain.revocation_latencies` measures, per round, how long after
A's revocation (RFC 7009) the derived tokens are inactive at B and at C (RFC 7662).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import EXECUTION, LEI, ClientKit, jwks_for, new_ec_key, wait_until
from tests.dpop.conftest import ProofKey
from tests.e2e.conftest import (
    LiveServer,
    LiveServers,
    client_credentials_token,
    introspect,
    register_client,
)

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
PARTNER_LEI = "529900T8BM49AURSDO55"
#: The deployments' settings: loopback HTTP for the transmitters, receivers and partners.
SSF_SETTINGS = {
    "ssf_allow_insecure_loopback": "true",  # push to http://127.0.0.1 receivers
    "allow_insecure_loopback_jwks_uri": "true",  # subscription clients' jwks_uri
    "federation_allow_insecure_loopback": "true",  # partners' http://127.0.0.1 issuers
    "ssf_subscribe_interval": "0.5",
}
#: A round that has not seen both derived tokens inactive after this long fails.
ROUND_LIMIT = 10.0


def operator_client(server: LiveServer, name: str, *args: str) -> ClientKit:
    """A client made by the operator of ``server`` (``trustplane clients add``)."""
    key, kid = new_ec_key(), "k1"
    jwks = Path(server.env["TRUSTPLANE_DATA_DIR"]) / f"{name}-jwks.json"
    jwks.write_text(json.dumps(jwks_for(key, kid)))
    made = server.cli_json(
        "clients", "add", "--lei", LEI, "--name", name, "--jwks-file", str(jwks), *args
    )
    return ClientKit(made["client_id"], key, server.issuer, kid=kid)


def trust(b: LiveServer, a: LiveServer, partner_id: str, client_id: str) -> None:
    """B's trust profile for A: A's issuer and keys, A's access tokens, A's SSF transmitter and
    B's client there (B's receiver then subscribes by itself)."""
    jwks = httpx.get(f"{a.base_url}/jwks", timeout=10).json()
    document = {
        "partner_id": partner_id,
        "name": partner_id,
        "lei": PARTNER_LEI,
        "issuers": [a.issuer],
        "keys": {"jwks": {"keys": [k for k in jwks["keys"] if k.get("alg") == "ES256"]}},
        "algorithms": ["ES256"],
        "max_assertion_lifetime": 900,
        "accepted_token_types": [ACCESS],
        "allowed_scopes": ["order:create"],
        "allowed_audiences": [EXECUTION],
        "ssf": {
            "configuration_url": f"{a.issuer}/.well-known/ssf-configuration",
            "client_id": client_id,
        },
    }
    path = Path(b.env["TRUSTPLANE_DATA_DIR"]) / f"partner-{partner_id}.json"
    path.write_text(json.dumps(document))
    b.cli("partners", "add", str(path))


def token(
    server: LiveServer, kit: ClientKit, dpop: ProofKey | None = None, **form: str
) -> dict[str, Any]:
    """POST /token; with ``dpop``, a DPoP proof of that key (RFC 9449 §5): the token is bound."""
    headers = {} if dpop is None else {"DPoP": dpop.proof(htu=f"{server.issuer}/token")}
    data = {**form, **kit.auth()}
    answer = httpx.post(f"{server.base_url}/token", data=data, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def link(upstream: LiveServer, downstream: LiveServer, partner_id: str) -> ClientKit:
    """``downstream`` trusts ``upstream`` and subscribes to its transmitter; returns the downstream
    resource server of EXECUTION, which exchanges upstream's tokens."""
    # the upstream operator registers the downstream's subscription client with the downstream's
    # published keys (it authenticates with its own signing key: private_key_jwt)
    made = upstream.cli_json(
        "clients", "add", "--lei", LEI, "--name", f"{partner_id}-ssf",
        "--jwks-uri", f"{downstream.issuer}/jwks", "--scope", "ssf:stream",
        "--resource", f"{upstream.issuer}/ssf", "--grant-type", "client_credentials",
    )  # fmt: skip
    trust(downstream, upstream, partner_id, made["client_id"])
    return operator_client(
        downstream, f"{partner_id}-execution", "--scope", "order:create", "--resource", EXECUTION,
        "--resource-server", EXECUTION, "--grant-type", EXCHANGE,
        "--grant-type", "client_credentials",
    )  # fmt: skip


#: the exchanging clients' DPoP key: a partner's token is exchanged only with a proof (the trust
#: profile's default token_binding, sender_constrained)
EXCHANGE_KEY = ProofKey.generate()


def exchange(server: LiveServer, kit: ClientKit, subject_token: str) -> str:
    return str(
        token(
            server, kit, EXCHANGE_KEY, grant_type=EXCHANGE, subject_token=subject_token,
            subject_token_type=ACCESS, resource=EXECUTION, scope="order:create",
        )["access_token"]
    )  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass
class SsfChain:
    """A, B and C, linked; ``arranger`` gets tokens at A, ``at_b_exec`` / ``at_c_exec`` exchange
    (and introspect) at B and C."""

    a: LiveServer
    b: LiveServer
    c: LiveServer
    arranger: ClientKit
    at_b_exec: ClientKit
    at_c_exec: ClientKit

    def chain(self) -> tuple[str, str, str]:
        """A fresh token at A and the tokens derived from it at B and at C."""
        at_a = client_credentials_token(self.a, self.arranger)
        at_b = exchange(self.b, self.at_b_exec, at_a)
        return at_a, at_b, exchange(self.c, self.at_c_exec, at_b)

    def revoke(self, at_a: str) -> None:
        answer = httpx.post(
            f"{self.a.base_url}/revoke", data={"token": at_a, **self.arranger.auth()}, timeout=10
        )
        assert answer.status_code == 200

    def active_at_b(self, derived: str) -> bool:
        return bool(introspect(self.b, self.at_b_exec, derived)["active"])

    def active_at_c(self, derived: str) -> bool:
        return bool(introspect(self.c, self.at_c_exec, derived)["active"])

    def subscribed(self) -> bool:
        """A revocation at A reaches C: both receivers have subscribed (a SET is only made for
        the streams that exist when the token is revoked, so each probe uses a fresh chain)."""
        try:
            at_a, _, at_c = self.chain()
        except AssertionError:  # clients and partners are still loading
            return False
        self.revoke(at_a)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if not self.active_at_c(at_c):
                return True
            time.sleep(0.05)
        return False

    def revocation_latencies(self, rounds: int) -> tuple[list[float], list[float]]:
        """Seconds from A's answer to the revocation until the derived token is inactive at B, and
        at C, one value each per round (each round a fresh chain, checked active first)."""
        at_b_latency: list[float] = []
        at_c_latency: list[float] = []
        for _ in range(rounds):
            at_a, at_b, at_c = self.chain()
            assert self.active_at_b(at_b) is True
            assert self.active_at_c(at_c) is True
            started = time.monotonic()
            self.revoke(at_a)
            pending = {"b": (self.active_at_b, at_b, at_b_latency)}
            pending["c"] = (self.active_at_c, at_c, at_c_latency)
            while pending:
                assert time.monotonic() < started + ROUND_LIMIT, (
                    f"still active at {sorted(pending)}"
                )
                for name, (active, derived, latencies) in list(pending.items()):
                    if not active(derived):
                        latencies.append(time.monotonic() - started)
                        del pending[name]
                time.sleep(0.005)
        return at_b_latency, at_c_latency


def start_chain(servers: LiveServers, subscribe_timeout: float = 45) -> SsfChain:
    """Start A, B and C (SQLite each), link them, and wait until B and C have subscribed."""
    a, b, c = (servers.start(**SSF_SETTINGS) for _ in range(3))
    arranger = register_client(a, resources=(EXECUTION,), introspection_resources=())
    at_b_exec = link(a, b, "arranger")  # B exchanges A's tokens
    at_c_exec = link(b, c, "broker")  # C exchanges B's tokens
    linked = SsfChain(a, b, c, arranger, at_b_exec, at_c_exec)
    wait_until(linked.subscribed, subscribe_timeout, "B and C to subscribe upstream", step=0.5)
    return linked
