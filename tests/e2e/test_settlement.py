"""Lifecycle step 5 against a live ``trustplane serve``: a settlement service (the reference
services, tokens validated by the PEP SDK against the server's JWKS) re-checks the mandate at
event time through the server's RFC 7662 introspection. While the mandate is live a trade settles;
after the mandate is revoked through the management API, the next settlement is refused and a
signed ``settlement.exception`` is in the outbox, never a silent success."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import EXECUTION, run_sync
from tests.e2e.conftest import LiveServers, client_credentials_token, register_client
from tests.e2e.test_mandates import grantee, mandate_token
from tests.mandates.conftest import GRANTOR, TRADE
from tests.reference.conftest import ORDER, RecordingPdp
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import PrivateKeyJwt, TokenValidator, TrustedIssuer
from trustplane.reference import machine
from trustplane.reference.entitlement import IntrospectionMandateCheck
from trustplane.reference.events import EventSigner
from trustplane.reference.services import Caller, EntitlementLost, TradeServices
from trustplane.reference.store import TradeStore
from trustplane.storage.db import Database

pytestmark = pytest.mark.e2e


def test_a_mandate_revoked_before_settlement_raises_an_exception(
    live_server: LiveServers, tmp_path: Path
) -> None:
    a = live_server.start()
    api = a.issuer + "/mandates"
    admin = register_client(
        a, scopes=("mandate:view", "mandate:administer"), resources=(api,),
        introspection_resources=(),
    )  # fmt: skip
    settlement = register_client(
        a, scopes=("order:create",), resources=(EXECUTION,), introspection_resources=(EXECUTION,)
    )
    kit = grantee(a)
    auth = {
        "Authorization": f"Bearer {client_credentials_token(a, admin, 'mandate:view mandate:administer', api)}"
    }
    created = httpx.post(
        f"{a.base_url}/mandates",
        json={"grantor_lei": GRANTOR, "grantor_person": "alice", "grantee_client_id": kit.client_id,
              "scopes": ["order:create"], "authorization_details": [TRADE], "accepted_by": "alice"},
        headers=auth, timeout=10,
    )  # fmt: skip
    assert created.status_code == 201, created.text
    mandate = created.json()
    token = mandate_token(a, kit, {"id": mandate["id"], "version": 1})

    async def lifecycle(revoke_first: bool) -> tuple[str, Any]:
        fetcher = OutboundFetcher(OutboundPolicy.development())
        validator = TokenValidator(
            audience=EXECUTION, issuers=[TrustedIssuer(a.issuer)], fetcher=fetcher
        )
        verified = await validator.validate(token)  # the real token, the server's JWKS
        check = IntrospectionMandateCheck(
            f"{a.base_url}/introspect",
            PrivateKeyJwt(settlement.client_id, settlement.key, settlement.kid, a.issuer),
            fetcher,
        )
        store = TradeStore(
            Database(f"sqlite+aiosqlite:///{tmp_path / f'ref-{revoke_first}.db'}"),
            EventSigner.generate("https://clearing.example"),
        )
        await store.create_schema()
        services, pdp = TradeServices(store, check), RecordingPdp()

        def as_(who: str) -> Caller:
            return Caller(who, verified.claims, verified.token, pdp.decide)

        trade = await services.create_order(as_("alice"), ORDER, "k")
        await services.execute(as_("broker"), trade.trade_id, "k")
        allocation = [{"account": "SUB-1", "quantity": "1000"}]
        await services.propose_allocation(as_("alice"), trade.trade_id, allocation, "k")
        await services.approve_allocation(as_("bob"), trade.trade_id, "k")
        if revoke_first:
            async with httpx.AsyncClient(timeout=10) as http:
                revoked = await http.post(
                    f"{a.base_url}/mandates/{mandate['id']}/revoke",
                    json={"reason": "withdrawn"},
                    headers=auth,
                )
            assert revoked.status_code == 200, revoked.text
        try:
            await services.submit_settlement(as_("clearing"), trade.trade_id, {"ssi": "X"}, "k")
            outcome: Any = (await store.trade(trade.trade_id)).state
        except EntitlementLost as lost:
            outcome = lost
        events = await store.events_after(0)
        jwks = store.signer.jwks()
        await store.db.dispose()
        await validator.aclose()
        await fetcher.aclose()
        last = jwt.decode(events[-1].jws, jwt.PyJWK(jwks["keys"][0]).key, algorithms=["ES256"])
        return outcome, last

    outcome, last = run_sync(lifecycle(revoke_first=False))
    assert outcome == machine.SETTLEMENT_SUBMITTED
    assert last["type"] == "settlement.submitted"
    assert last["data"]["mandate"]["reason"] == "active"

    outcome, last = run_sync(lifecycle(revoke_first=True))
    assert isinstance(outcome, EntitlementLost)
    assert outcome.exception.reason == "mandate_not_usable"
    assert last["type"] == "settlement.exception"
    assert last["state"] == machine.EXCEPTION
    assert last["envelope"]["mandate"] == {"id": mandate["id"], "version": 1}
    assert last["data"]["mandate"]["usable"] is False
