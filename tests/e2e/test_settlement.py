"""The reference lifecycle against a live ``trustplane serve``, every step decided by the server's
own PDP over AuthZEN with the default Cedar bundle (no PDP inside the test): tokens validated by the
PEP SDK against the server's JWKS, the PDP subject the HTTP layer sends (``client_subject``), the
mandate re-checked at event time through the server's RFC 7662 introspection.

While the mandate is live the whole path is allowed (create, execute, propose, approve by another
person, submit, settle) and each allow is a decision of the default bundle (``trade.lifecycle``);
a token of another transaction is refused at settlement (``trade.transaction``). After the mandate is
revoked through the management API, the settlement is refused (``trade.mandate_live``), a signed
``settlement.exception`` is in the outbox and the deny is in the deployment's ledger under the
transaction; an operator (``exception:resolve``) re-consents, a desk client may not
(``exception.operator_only``).

Each service's outbox is then forwarded to the server's ledger (``LedgerForwarder`` in process, and
``trustplane reference forward --to-ledger`` -> ``POST /audit/events``, the service's own client
with ``audit:ingest``): the ledger query by the
transaction shows every transition (the exception and its resolution included) next to the
decisions, each entry carrying the signed event, which verifies with the service's key; sent again,
every event is a duplicate and nothing is entered twice."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import EXECUTION, KEK, LEI, ClientKit, run_sync, wait_until
from tests.e2e.conftest import (
    LiveServer,
    LiveServers,
    client_credentials_token,
    knows_client,
    register_client,
    run_cli,
)
from tests.e2e.test_ledger import audit_token
from tests.e2e.test_mandates import grantee
from tests.mandates.conftest import GRANTOR, TRADE
from tests.reference.conftest import ORDER
from trustplane.app import Services
from trustplane.authzen.model import Decision, Entity
from trustplane.outbound import OutboundFetcher, OutboundPolicy
from trustplane.pep import (
    AccessToken,
    AuthzenClient,
    PrivateKeyJwt,
    TokenValidator,
    TrustedIssuer,
    client_subject,
)
from trustplane.protocol.tokens import issue_access_token
from trustplane.reference import machine
from trustplane.reference.entitlement import IntrospectionMandateCheck
from trustplane.reference.events import EventSigner, verify_event
from trustplane.reference.ledger_forwarder import LedgerForwarder
from trustplane.reference.serve import create_schemas, dispatcher_of, dispose, open_stores
from trustplane.reference.services import Caller, EntitlementLost, Refused, TradeServices
from trustplane.reference.settings import ReferenceSettings
from trustplane.settings import Settings

pytestmark = pytest.mark.e2e

DESK = (
    "order:create trade:execute allocation:propose allocation:approve settlement:submit "
    "settlement:confirm"
)
OPERATOR = "exception:view exception:resolve"


def mint(server: LiveServer, kit: ClientKit, scope: str, extra: dict[str, Any]) -> str:
    """A token as the code/refresh grants issue it (the cluster's key, audience the services)."""

    async def issue() -> str:
        env = server.env
        settings = Settings(
            database_url=env["TRUSTPLANE_DATABASE_URL"], data_dir=Path(env["TRUSTPLANE_DATA_DIR"]),
            key_encryption_key=KEK, issuer=server.issuer,
        )  # fmt: skip
        svc = Services.build(settings)
        try:
            ring = await svc.keys.load()
            return issue_access_token(
                ring, issuer=server.issuer, subject="alice", client_id=kit.client_id,
                audience=EXECUTION, scopes=tuple(scope.split()), lifetime=300,
                extra={"lei": LEI, **extra},
            ).token  # fmt: skip
        finally:
            await svc.db.dispose()

    token: str = run_sync(issue())
    return token


def service_client(
    server: LiveServer, signer: EventSigner, jwks: dict[str, Any] | None = None
) -> ClientKit:
    """The settlement service's client, registered by the operator: resource server for the
    services' audience (introspection, and the ``iss`` of its events), ``audit:ingest`` for the
    ledger, and the event keys (``jwks``, default the signer's; the signer's key is also its
    private_key_jwt key) in its JWKS."""
    jwks_file = Path(server.env["TRUSTPLANE_DATA_DIR"]) / f"svc-jwks-{time.monotonic_ns()}.json"
    jwks_file.write_text(json.dumps(jwks or signer.jwks()))
    body = server.cli_json(
        "clients", "add", "--lei", LEI, "--jwks-file", str(jwks_file), "--name", "settlement",
        "--scope", "order:create", "--scope", "audit:ingest",
        "--resource", EXECUTION, "--resource", server.issuer + "/audit",
        "--resource-server", EXECUTION,
    )  # fmt: skip
    kit = ClientKit(body["client_id"], signer.key, server.issuer, kid=signer.kid)
    wait_until(lambda: knows_client(server, kit), 30, "the server to load the service's client")
    return kit


def test_the_lifecycle_is_decided_by_the_live_pdp_and_a_revoked_mandate_raises_an_exception(
    live_server: LiveServers, tmp_path: Path
) -> None:
    a = live_server.start()
    api = a.issuer + "/mandates"
    admin = register_client(
        a, scopes=("mandate:view", "mandate:administer"), resources=(api,),
        introspection_resources=(),
    )  # fmt: skip

    # each service its own store and key (as the CLI opens them from the same settings); the
    # events' iss: the services' audience; the settlement's key also serves the CLI's forwarder
    def reference_env(flag: bool) -> dict[str, str]:
        return {
            "TRUSTPLANE_REFERENCE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / f'ref-{flag}.db'}",
            "TRUSTPLANE_REFERENCE_EVENT_KEY_FILE": str(tmp_path / "events.pem"),
            "TRUSTPLANE_REFERENCE_ISSUER": EXECUTION,
        }

    owners = open_stores(ReferenceSettings.from_env(reference_env(False)))
    signer, all_keys = owners.settlement.signer, owners.jwks()
    settlement = service_client(a, signer, all_keys)
    kit = grantee(a)
    pdp_kit = register_client(
        a, scopes=("decision:evaluate",), resources=(f"{a.issuer}/access/v1",),
        introspection_resources=(),
    )  # fmt: skip
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
    ref = {"id": mandate["id"], "version": 1}
    txns = {flag: f"txn-e2e-{secrets.token_hex(4)}" for flag in (False, True)}
    tokens = {
        flag: mint(a, kit, DESK, {"mandate": ref, "authorization_details": [TRADE], "txn": txn})
        for flag, txn in txns.items()
    }
    stranger = mint(a, kit, DESK, {"mandate": ref, "txn": "txn-e2e-another"})
    operator = mint(a, settlement, OPERATOR, {"txn": txns[True]})

    async def lifecycle(revoke_first: bool) -> dict[str, Any]:
        fetcher = OutboundFetcher(OutboundPolicy.development())
        validator = TokenValidator(
            audience=EXECUTION, issuers=[TrustedIssuer(a.issuer)], fetcher=fetcher
        )
        check = IntrospectionMandateCheck(
            f"{a.base_url}/introspect",
            PrivateKeyJwt(settlement.client_id, settlement.key, settlement.kid, a.issuer),
            fetcher,
        )
        stores = open_stores(ReferenceSettings.from_env(reference_env(revoke_first)))
        await create_schemas(stores)
        store = stores.settlement
        services = TradeServices(stores, check, handoff=dispatcher_of(stores, machine.SERVICES))
        live_pdp = AuthzenClient(
            a.issuer,
            token_endpoint=f"{a.issuer}/token",
            auth=PrivateKeyJwt(pdp_kit.client_id, pdp_kit.key, pdp_kit.kid, a.issuer),
            fetcher=fetcher,
        )
        asked: list[tuple[str, Decision]] = []

        async def caller(who: str, raw: str) -> Caller:
            token: AccessToken = await validator.validate(raw)  # the server's JWKS

            async def decide(action: str, resource: Entity, context: Mapping[str, Any]) -> Decision:
                # what reference/http.py sends: the token's client as subject, its txn
                decision = await live_pdp.decide(
                    client_subject(token), action, resource, context,
                    transaction_id=token.claims.get("txn"),
                )  # fmt: skip
                asked.append((action, decision))
                return decision

            return Caller(who, token.claims, token.token, decide)

        desk = tokens[revoke_first]
        out: dict[str, Any] = {"asked": asked}
        trade = await services.create_order(await caller("alice", desk), ORDER, "k1")
        out["trade_id"] = trade.trade_id
        await services.execute(await caller("broker", desk), trade.trade_id, "k2")
        allocation = [{"account": "SUB-1", "quantity": "1000"}]
        await services.propose_allocation(
            await caller("alice", desk), trade.trade_id, allocation, "k3"
        )
        await services.approve_allocation(await caller("bob", desk), trade.trade_id, "k4")
        if revoke_first:
            async with httpx.AsyncClient(timeout=10) as http:
                revoked = await http.post(
                    f"{a.base_url}/mandates/{mandate['id']}/revoke",
                    json={"reason": "withdrawn"},
                    headers=auth,
                )
            assert revoked.status_code == 200, revoked.text
        else:
            # a token of another transaction does not settle this trade
            with pytest.raises(Refused) as foreign:
                await services.submit_settlement(
                    await caller("clearing", stranger), trade.trade_id, {"ssi": "X"}, "k5"
                )
            out["foreign"] = foreign.value
        try:
            await services.submit_settlement(
                await caller("clearing", desk), trade.trade_id, {"ssi": "X"}, "k6"
            )
            await services.confirm_settlement(
                await caller("clearing", desk), trade.trade_id, "settled", "k7"
            )
            out["outcome"] = (await stores.reporting.trade(trade.trade_id)).state
        except EntitlementLost as lost:
            out["outcome"] = lost
            events = await store.events_after(0)
            jwks = store.signer.jwks()
            out["last"] = jwt.decode(
                events[-1].jws, jwt.PyJWK(jwks["keys"][0]).key, algorithms=["ES256"]
            )
            exception_id = lost.exception.exception_id
            # a desk client is not an operator; an operator re-consents
            with pytest.raises(Refused) as not_operator:
                await services.resolve_exception(
                    await caller("alice", desk), exception_id, "reconsent"
                )
            out["not_operator"] = not_operator.value
            resolved = await services.resolve_exception(
                await caller("ops", operator), exception_id, "reconsent"
            )
            out["resolved"] = resolved.status
            out["state_after"] = (await store.trade(trade.trade_id)).state
        # the outbox into the server's ledger, as the service's own client (the other lifecycle's
        # by ``trustplane reference forward --to-ledger``, below)
        owned = [stores.by_service()[o] for o in machine.OWNERS]
        if revoke_first:  # each owner's outbox, in the machine's order
            own = PrivateKeyJwt(settlement.client_id, settlement.key, settlement.kid, a.issuer)
            out["forwarded"], out["left"] = 0, []
            for owner in owned:
                forwarder = LedgerForwarder(owner, a.issuer, own, fetcher)
                out["forwarded"] += await forwarder.forward_all()
                out["left"] += await owner.undelivered_to_ledger()
        out["jws"] = [e.jws for owner in owned for e in await owner.events_after(0, 1000)]
        await dispose(stores)
        await validator.aclose()
        await live_pdp.aclose()
        await fetcher.aclose()
        return out

    live = run_sync(lifecycle(revoke_first=False))
    assert live["outcome"] == machine.SETTLED
    env = {**a.env, **reference_env(False)}
    forward = ("reference", "forward", "--to-ledger", a.issuer, "--client-id",
               settlement.client_id, "--once", "--allow-loopback", "--json")  # fmt: skip
    assert json.loads(run_cli(env, *forward)) == {"delivered": len(live["jws"])}
    assert json.loads(run_cli(env, *forward)) == {"delivered": 0}  # nothing left, nothing again
    foreign = live["foreign"]
    assert (foreign.status, foreign.code) == (403, "denied")
    allowed = [(action, d.reason_ids) for action, d in live["asked"] if d.allowed]
    assert allowed == [
        ("trade:create", ("trade.lifecycle",)),
        ("trade:execute", ("trade.lifecycle",)),
        ("trade:propose_allocation", ("trade.lifecycle",)),
        ("trade:approve_allocation", ("trade.lifecycle",)),
        ("trade:submit_settlement", ("trade.lifecycle",)),
        ("trade:confirm_settlement", ("trade.lifecycle",)),
    ]
    denied = [(action, d.reason_ids) for action, d in live["asked"] if not d.allowed]
    assert denied == [("trade:submit_settlement", ("trade.transaction",))]
    assert all(d.bundle_version and d.decision_id for _, d in live["asked"])

    lost = run_sync(lifecycle(revoke_first=True))
    outcome, last = lost["outcome"], lost["last"]
    assert isinstance(outcome, EntitlementLost)
    assert outcome.exception.reason == "mandate_not_usable"
    assert last["type"] == "settlement.exception"
    assert last["state"] == machine.EXCEPTION
    assert last["envelope"]["mandate"] == {"id": mandate["id"], "version": 1}
    assert last["data"]["mandate"]["usable"] is False
    decision_id = outcome.extra["decision_id"]
    assert last["envelope"]["decision_ids"] == [decision_id]
    by_id = {d.decision_id: (action, d) for action, d in lost["asked"]}
    assert by_id[decision_id][1].reason_ids == ("trade.mandate_live",)
    not_operator = lost["not_operator"]
    assert (not_operator.status, not_operator.code) == (403, "denied")
    denied = [(action, d.reason_ids) for action, d in lost["asked"] if not d.allowed]
    assert denied == [
        ("trade:submit_settlement", ("trade.mandate_live",)),
        ("exception:reconsent", ("exception.operator_only",)),
    ]
    assert (lost["resolved"], lost["state_after"]) == ("resolved", machine.ALLOCATION_APPROVED)

    # the deny is in the deployment's ledger, under the transaction
    audit = {"Authorization": f"Bearer {audit_token(a)}"}
    txn = txns[True]

    def deny_in_ledger() -> Any:
        answer = httpx.get(f"{a.base_url}/audit/transactions/{txn}", headers=audit, timeout=10)
        return decision_id in answer.text and answer.json()

    chain = wait_until(deny_in_ledger, 30, "the deny in the ledger")
    (entry,) = [e for e in chain["entries"] if e["entry"]["event_id"] == decision_id]
    assert entry["entry"]["type"] == "policy:decision:denied"
    assert entry["entry"]["decision"] == "deny"
    assert entry["entry"]["reason_ids"] == ["trade.mandate_live"]
    assert entry["payload"]["action"] == "trade:submit_settlement"
    assert entry["payload"]["resource"] == f'Trade::"{outcome.exception.trade_id}"'
    assert entry["inclusion_proof"]  # against the signed checkpoint of the answer

    # the transitions are in the ledger under the transaction, next to the decisions
    assert (lost["forwarded"], lost["left"]) == (len(lost["jws"]), [])
    trade_types = [
        "trade:order:created", "trade:trade:executed", "trade:allocation:proposed",
        "trade:allocation:approved", "trade:settlement:exception", "trade:exception:resolved",
    ]  # fmt: skip

    def transitions_in_ledger() -> Any:
        answer = httpx.get(f"{a.base_url}/audit/transactions/{txn}", headers=audit, timeout=10)
        found = [e for e in answer.json()["entries"] if e["entry"]["type"].startswith("trade:")]
        return len(found) == len(trade_types) and answer.json()

    chain = wait_until(transitions_in_ledger, 30, "the transitions in the ledger")
    types = [e["entry"]["type"] for e in chain["entries"]]
    assert [t for t in types if t.startswith("trade:")] == trade_types
    assert "policy:decision:denied" in types
    (opened,) = [e for e in chain["entries"] if e["entry"]["type"] == "trade:settlement:exception"]
    assert opened["entry"]["issuer"] == EXECUTION
    assert opened["entry"]["transaction_id"] == txn
    assert opened["entry"]["reason"] == "mandate_not_usable"
    assert opened["entry"]["mandate_id"] == mandate["id"]
    assert opened["inclusion_proof"]
    evidence = verify_event(opened["payload"]["jws"], all_keys, issuer=EXECUTION)
    assert evidence["envelope"]["decision_ids"] == [decision_id]  # names the deny beside it
    assert opened["payload"]["exception_id"] == outcome.exception.exception_id
    (resolved,) = [e for e in chain["entries"] if e["entry"]["type"] == "trade:exception:resolved"]
    assert resolved["payload"]["exception_id"] == outcome.exception.exception_id
    assert resolved["entry"]["reason"] == "reconsent"

    # sent again (a forwarder that lost the answer): every event a duplicate, nothing entered twice
    ingest = client_credentials_token(a, settlement, "audit:ingest", a.issuer + "/audit")
    again = httpx.post(
        f"{a.base_url}/audit/events", json={"events": lost["jws"]},
        headers={"Authorization": f"Bearer {ingest}"}, timeout=10,
    )  # fmt: skip
    assert again.status_code == 200, again.text
    assert (again.json()["recorded"], again.json()["duplicates"]) == (0, len(lost["jws"]))
    recount = httpx.get(f"{a.base_url}/audit/transactions/{txn}", headers=audit, timeout=10)
    assert (
        len([e for e in recount.json()["entries"] if e["entry"]["type"].startswith("trade:")]) == 6
    )
