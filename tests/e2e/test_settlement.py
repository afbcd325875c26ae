"""Lifecycle step 5 against a live ``trustplane serve``: a settlement service (the reference
services, tokens validated by the PEP SDK against the server's JWKS) re-checks the mandate at
event time through the server's RFC 7662 introspection. While the mandate is live a trade settles;
after the mandate is revoked through the management API, the next settlement is refused and a
signed ``settlement.exception`` is in the outbox, never a silent success."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import EXECUTION, run_sync, wait_until
from tests.e2e.conftest import LiveServers, client_credentials_token, register_client
from tests.e2e.test_ledger import audit_token
from tests.e2e.test_mandates import grantee, mandate_token
from tests.mandates.conftest import GRANTOR, TRADE
from tests.reference.conftest import ORDER, RecordingPdp
from trustplane.authzen.model import Decision, Entity
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import AuthzenClient, PrivateKeyJwt, TokenValidator, TrustedIssuer
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
    pdp_kit = register_client(
        a, scopes=("decision:evaluate",), resources=(f"{a.issuer}/access/v1",),
        introspection_resources=(),
    )  # fmt: skip
    txn = f"txn-e2e-{secrets.token_hex(4)}"
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
        live_pdp = AuthzenClient(
            a.issuer,
            token_endpoint=f"{a.issuer}/token",
            auth=PrivateKeyJwt(pdp_kit.client_id, pdp_kit.key, pdp_kit.kid, a.issuer),
            fetcher=fetcher,
        )

        async def decide(action: str, resource: Entity, context: Mapping[str, Any]) -> Decision:
            if action == "settlement:submit" and revoke_first:
                # the entitlement decision goes to the deployment's PDP over AuthZEN, which
                # records it in the ledger under the transaction. The default bundle's schema
                # has no Trade entity: a fail-closed deny (reason invalid_request).
                return await live_pdp.decide(
                    Entity("Client", kit.client_id), action, resource, context,
                    transaction_id=txn,
                )  # fmt: skip
            return await pdp.decide(action, resource, context)

        def as_(who: str) -> Caller:
            return Caller(who, verified.claims, verified.token, decide)

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
        await live_pdp.aclose()
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
    decision_id = outcome.extra["decision_id"]
    assert last["envelope"]["decision_ids"] == [decision_id]

    # the deny is in the deployment's ledger, under the transaction
    audit = {"Authorization": f"Bearer {audit_token(a)}"}

    def deny_in_ledger() -> Any:
        answer = httpx.get(f"{a.base_url}/audit/transactions/{txn}", headers=audit, timeout=10)
        return decision_id in answer.text and answer.json()

    chain = wait_until(deny_in_ledger, 30, "the deny in the ledger")
    (entry,) = [e for e in chain["entries"] if e["entry"]["event_id"] == decision_id]
    assert entry["entry"]["type"] == "policy:decision:denied"
    assert entry["entry"]["decision"] == "deny"
    assert entry["payload"]["action"] == "settlement:submit"
    assert entry["payload"]["resource"] == f'Trade::"{outcome.exception.trade_id}"'
    assert entry["inclusion_proof"]  # against the signed checkpoint of the answer
