"""A revocation at the issuer raises the exception on the trade in flight by itself (issue 14 item 5,
last clause), on real processes: a live ``trustplane serve`` (the issuer and its SSF transmitter)
and ``trustplane reference signals`` (the settlement service's receiver, a poll stream with its own
``ssf:stream`` client, ``private_key_jwt``) on the services' store. The test moves trades with real
tokens of the issuer, then revokes at the issuer (RFC 7009 ``/revoke`` of the acting token; the
mandate through the management API) and only watches the store: no further call to the services.

Printed: the time from the revocation request to the trade in ``exception`` (p50 and max over
``ROUNDS`` token revocations, and the mandate revocations); nothing timed is asserted."""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import EXECUTION, run_sync, wait_until
from tests.e2e.conftest import (
    TRUSTPLANE,
    LiveServer,
    LiveServers,
    _die_with_parent,
    client_credentials_token,
    register_client,
)
from tests.e2e.test_mandates import grantee
from tests.e2e.test_settlement import mint
from tests.mandates.conftest import GRANTOR, TRADE
from tests.reference.conftest import ORDER, Mandates, RecordingPdp
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import PrivateKeyJwt, TokenValidator, TrustedIssuer
from trustplane.reference import machine
from trustplane.reference.receiver import SignalReceiver
from trustplane.reference.serve import create_schemas, dispatcher_of, dispose, open_stores
from trustplane.reference.services import Caller, TradeServices
from trustplane.reference.settings import ReferenceSettings
from trustplane.reference.signals import SignalError

pytestmark = pytest.mark.e2e
ROUNDS = 5
MANDATE_ROUNDS = 2
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
ALLOC = [{"account": "SUB-1", "quantity": "1000"}]
#: Not a timing assertion: how long the test waits before it reports the exception never came.
GIVE_UP = 30.0


def receiver_env(a: LiveServer, tmp_path: Path, client_id: str, kid: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
    env.update(
        TRUSTPLANE_REFERENCE_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'reference.db'}",
        TRUSTPLANE_REFERENCE_EVENT_KEY_FILE=str(tmp_path / "events.pem"),
        TRUSTPLANE_REFERENCE_ISSUER="https://settlement.example",
        TRUSTPLANE_REFERENCE_SSF_CONFIGURATION_URL=f"{a.issuer}/.well-known/ssf-configuration",
        TRUSTPLANE_REFERENCE_SSF_CLIENT_ID=client_id,
        TRUSTPLANE_REFERENCE_SSF_CLIENT_KEY_FILE=str(tmp_path / "signals-client.pem"),
        TRUSTPLANE_REFERENCE_SSF_CLIENT_KID=kid,
        TRUSTPLANE_REFERENCE_SSF_ALLOW_INSECURE_LOOPBACK="true",
    )
    return env


def test_a_revocation_at_the_issuer_moves_the_trade_in_flight_to_exception(
    live_server: LiveServers, tmp_path: Path
) -> None:
    a = live_server.start()
    signals_kit = register_client(
        a, scopes=("ssf:stream",), resources=(f"{a.issuer}/ssf",), introspection_resources=()
    )
    desk = register_client(
        a, scopes=("order:create",), resources=(EXECUTION,), introspection_resources=()
    )
    api = a.issuer + "/mandates"
    admin = register_client(
        a, scopes=("mandate:view", "mandate:administer"), resources=(api,),
        introspection_resources=(),
    )  # fmt: skip
    grantee_kit = grantee(a)
    admin_auth = {
        "Authorization": "Bearer "
        + client_credentials_token(a, admin, "mandate:view mandate:administer", api)
    }
    (tmp_path / "signals-client.pem").write_bytes(signals_kit.pem)
    env = receiver_env(a, tmp_path, signals_kit.client_id, signals_kit.kid)
    settings = ReferenceSettings.from_env(env)
    run_sync(_schema(settings))

    log_path = tmp_path / "signals.log"
    with log_path.open("wb") as log:
        receiver = subprocess.Popen(
            [TRUSTPLANE, "reference", "signals"], env=env, stdout=log, stderr=subprocess.STDOUT,
            cwd=tmp_path, preexec_fn=_die_with_parent,
        )  # fmt: skip
    try:
        ssf_token = client_credentials_token(a, signals_kit, "ssf:stream", f"{a.issuer}/ssf")

        def subscribed() -> bool:
            assert receiver.poll() is None, log_path.read_text(errors="replace")
            streams = httpx.get(
                f"{a.base_url}/ssf/stream",
                headers={"Authorization": f"Bearer {ssf_token}"},
                timeout=10,
            )
            return streams.status_code == 200 and len(streams.json()) == 1

        wait_until(subscribed, 30, "the receiver's poll stream at the issuer", step=0.2)

        def mandate() -> dict[str, Any]:
            created = httpx.post(
                f"{a.base_url}/mandates",
                json={"grantor_lei": GRANTOR, "grantor_person": "alice",
                      "grantee_client_id": grantee_kit.client_id, "scopes": ["order:create"],
                      "authorization_details": [TRADE], "accepted_by": "alice"},
                headers=admin_auth, timeout=10,
            )  # fmt: skip
            assert created.status_code == 201, created.text
            return dict(created.json())

        mandates = [mandate() for _ in range(MANDATE_ROUNDS)]
        mandate_tokens = [
            mint(a, grantee_kit, "order:create", {"mandate": {"id": m["id"], "version": 1},
                                                   "txn": f"txn-sig-{secrets.token_hex(4)}"})
            for m in mandates
        ]  # fmt: skip
        out = run_sync(
            _rounds(a, settings, desk, signals_kit, admin_auth, mandates, mandate_tokens)
        )
        assert receiver.poll() is None, log_path.read_text(errors="replace")
    finally:
        receiver.terminate()
        try:
            receiver.wait(10)
        except subprocess.TimeoutExpired:
            receiver.kill()
            receiver.wait(10)

    for name, latencies in (("token", out["token"]), ("mandate", out["mandate"])):
        print(
            f"{name} revoked at the issuer -> trade in exception over {len(latencies)}: "
            f"p50 {statistics.median(latencies) * 1000:.0f} ms, "
            f"max {max(latencies) * 1000:.0f} ms"
        )
    for evidence in out["token_events"]:
        assert evidence["event_type"] == SESSION_REVOKED
        assert evidence["reason"] == "token_revoked"
        assert evidence["iss"] == a.issuer
        assert evidence["jti"]  # the SET's jti
    for evidence in out["mandate_events"]:
        assert evidence["reason"] == "mandate_revoked"
        assert evidence["mandate_id"] in {m["id"] for m in mandates}
    # what rested on nothing revoked did not move; what was final stayed final
    assert out["control"] == machine.ALLOCATION_APPROVED
    assert out["settled"] == machine.SETTLED


async def _schema(settings: ReferenceSettings) -> None:
    stores = open_stores(settings)
    await create_schemas(stores)
    await dispose(stores)


async def _rounds(
    a: LiveServer,
    settings: ReferenceSettings,
    desk: Any,
    signals_kit: Any,
    admin_auth: dict[str, str],
    mandates: list[dict[str, Any]],
    mandate_tokens: list[str],
) -> dict[str, Any]:
    fetcher = OutboundFetcher(OutboundPolicy.development())
    validator = TokenValidator(
        audience=EXECUTION, issuers=[TrustedIssuer(a.issuer)], fetcher=fetcher
    )
    # each service its own store, as the receiver process opens them from the same settings; the
    # receiver raises the exception on the settlement's and hands it to the others
    stores = open_stores(settings)
    store, signer = stores.settlement, stores.settlement.signer
    pdp = RecordingPdp()
    services = TradeServices(stores, Mandates(), handoff=dispatcher_of(stores, machine.SERVICES))
    out: dict[str, Any] = {"token": [], "mandate": [], "token_events": [], "mandate_events": []}

    async def in_flight(raw: str, *, settle: bool = False) -> str:
        claims = (await validator.validate(raw)).claims
        desk_caller = Caller("desk", claims, raw, pdp.decide)
        trade = await services.create_order(desk_caller, ORDER, "k")
        await services.execute(desk_caller, trade.trade_id, "k")
        await services.propose_allocation(desk_caller, trade.trade_id, ALLOC, "k")
        approver = Caller("approver", claims, raw, pdp.decide)
        await services.approve_allocation(approver, trade.trade_id, "k")
        if settle:
            await services.submit_settlement(desk_caller, trade.trade_id, {"ssi": "X"}, "k")
            await services.confirm_settlement(desk_caller, trade.trade_id, "settled", "k")
        return trade.trade_id

    async def until_exception(trade_id: str, started: float) -> float:
        while (await store.trade(trade_id)).state != machine.EXCEPTION:
            assert time.monotonic() < started + GIVE_UP, f"trade {trade_id} never left flight"
            await asyncio.sleep(0.005)
        return time.monotonic() - started

    async def evidence(trade_id: str) -> dict[str, Any]:
        key = jwt.PyJWK(signer.jwks()["keys"][0]).key
        (event,) = [
            e for e in await store.events_after(0, limit=10_000)
            if e.trade_id == trade_id and e.type == "settlement.exception"
        ]  # fmt: skip
        claims = jwt.decode(event.jws, key, algorithms=["ES256"])
        assert claims["state"] == machine.EXCEPTION
        signal: dict[str, Any] = claims["data"]["signal"]
        return signal

    # a configuration URL not formed from the issuer it answers is refused (SSF 1.0 §7.2)
    elsewhere = f"{a.issuer}/.well-known/ssf-configuration?tenant=other"
    auth = PrivateKeyJwt(signals_kit.client_id, signals_kit.key, signals_kit.kid, a.issuer)
    wrong = SignalReceiver(services, elsewhere, auth, fetcher)
    with pytest.raises(SignalError, match="issuer is not the one"):
        await wrong.connect()

    control = await in_flight(client_credentials_token(a, desk))
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(ROUNDS):
            raw = client_credentials_token(a, desk)
            trade_id = await in_flight(raw)
            started = time.monotonic()
            revoked = await http.post(f"{a.base_url}/revoke", data={"token": raw, **desk.auth()})
            assert revoked.status_code == 200, revoked.text
            out["token"].append(await until_exception(trade_id, started))
            signal = await evidence(trade_id)
            assert (
                signal["token_jti"] == jwt.decode(raw, options={"verify_signature": False})["jti"]
            )
            out["token_events"].append(signal)
        settled = await in_flight(mandate_tokens[0], settle=True)
        for m, raw in zip(mandates, mandate_tokens, strict=True):
            trade_id = await in_flight(raw)
            started = time.monotonic()
            revoked = await http.post(
                f"{a.base_url}/mandates/{m['id']}/revoke",
                json={"reason": "withdrawn"},
                headers=admin_auth,
            )
            assert revoked.status_code == 200, revoked.text
            out["mandate"].append(await until_exception(trade_id, started))
            out["mandate_events"].append(await evidence(trade_id))
    out["control"] = (await store.trade(control)).state
    out["settled"] = (await store.trade(settled)).state
    assert (await stores.allocation.trade(control)).state == out["control"]
    await dispose(stores)
    await validator.aclose()
    await fetcher.aclose()
    return out
