"""The reference lifecycle (BRIEF.md, steps 1-6) across three deployments and the reference
services, each outcome checked; :func:`run` returns the machine-readable summary."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from trustplane.demo import ledgers
from trustplane.demo.parties import (
    ALICE_PASSWORD,
    ARRANGER,
    ARRANGER_ORDERS,
    BROKER,
    BROKER_DESK,
    BROKER_EXECUTION,
    CLEARING_OPS,
    CLEARING_SETTLEMENT,
    EXCHANGE,
    NORTHWIND,
    REDIRECT_URI,
    SCOPES,
    TRADE,
    VOCABULARY,
    DpopKey,
    Party,
    Pending,
    claims_of,
    consent,
    new_key,
    write_key,
)
from trustplane.demo.processes import (
    DemoFailed,
    Deployment,
    Processes,
    ReferenceService,
    expect,
)
from trustplane.pep import PrivateKeyJwt

ORDER = {"account": "ACC-1", "instrument": "XS0000000001", "side": "buy",
         "quantity": "1000", "amount": "1000000", "currency": "EUR"}  # fmt: skip
#: Step 2 narrows the consented details to this one order's notional (1m EUR).
NARROWED = {**TRADE, "max_notional": {"amount": 100_000_000, "currency": "EUR", "minor_units": 2}}
ALLOCATIONS = [{"account": "SUB-1", "quantity": "600"}, {"account": "SUB-2", "quantity": "400"}]
INSTRUCTIONS = {"ssi": "CLR-BRK-001", "settlement_date": "2026-12-04", "amount": "1000000"}


@dataclass
class Options:
    workdir: Path
    log_level: str = "warning"
    nats_url: str | None = None


@dataclass
class Run:
    """What the run found, step by step (the JSON summary is built from it)."""

    console: Console
    steps: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @contextmanager
    def step(self, number: str, title: str) -> Iterator[dict[str, Any]]:
        self.console.print(f"\n[bold cyan]{number}[/]  [bold]{title}[/]", highlight=False)
        record: dict[str, Any] = {"step": number, "title": title, "ok": False}
        self.steps.append(record)
        t0 = time.monotonic()
        yield record
        record["ok"] = True
        record["seconds"] = round(time.monotonic() - t0, 2)

    def show(self, label: str, value: Any) -> None:
        self.console.print(f"   [dim]{label}:[/] {value}", highlight=False, soft_wrap=True)


def _key() -> str:
    return f'"{secrets.token_hex(12)}"'  # an RFC 8941 sf-string


def call(
    url: str, token: str, body: Any = None, key: str | None = None, dpop: DpopKey | None = None
) -> httpx.Response:
    """``dpop``: the token is DPoP-bound to that key: ``Authorization: DPoP`` and a fresh proof
    of the request (RFC 9449 §7.1; ``htu`` without the query, §4.3)."""
    headers = {"Authorization": f"Bearer {token}"}
    if dpop is not None:
        method = "GET" if body is None and key is None else "POST"
        headers = {
            "Authorization": f"DPoP {token}",
            "DPoP": dpop.proof(method, url.partition("?")[0], token),
        }
    if key is not None:
        headers["Idempotency-Key"] = key
    if body is None and key is None:
        return httpx.get(url, headers=headers, timeout=15)
    return httpx.post(url, json=body or {}, headers=headers, timeout=15)


def ok(response: httpx.Response, status: int, what: str) -> dict[str, Any]:
    expect(response.status_code == status, f"{what}: {response.status_code} {response.text[:400]}")
    return dict(response.json())


def parallel(*jobs: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def poll(check: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Seconds until ``check()`` held; DemoFailed after ``timeout``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise DemoFailed(f"{what} within {timeout:g} s")
        time.sleep(step)
    return time.monotonic() - t0


def run(options: Options, state: Run, processes: Processes) -> None:
    """The whole lifecycle; what it found goes into ``state`` (also when a step fails)."""
    workdir = options.workdir
    names = ("arranger", "broker", "clearing")
    deployments = {n: Deployment(n, workdir, VOCABULARY[n], options.log_level) for n in names}
    a, b, c = (Party(deployments[n]) for n in names)
    store_dir = workdir / "reference"
    with state.step("0", "three deployments on the embedded default (SQLite, keys made at start)"):
        for d in deployments.values():
            processes.add(d.start())
            assert d.operator is not None
            processes.add(d.operator)
        for d in deployments.values():
            d.wait_ready()
            state.show(d.name, d.issuer)
        state.facts["deployments"] = {d.name: d.issuer for d in deployments.values()}

    with state.step("0", "federation: clients, trust profiles with SSF; reference services"):
        wiring = _wire(a, b, c, store_dir, options, processes, state)
    _lifecycle(state, a, b, c, wiring)


@dataclass
class Wiring:
    orders: PrivateKeyJwt
    execution: PrivateKeyJwt
    desk: PrivateKeyJwt
    supervisor: PrivateKeyJwt
    ops: PrivateKeyJwt
    mandate_admin: PrivateKeyJwt
    broker_introspect: PrivateKeyJwt
    clearing_introspect: PrivateKeyJwt
    auditors: dict[str, PrivateKeyJwt]
    broker_ref: ReferenceService
    clearing_ref: ReferenceService
    #: The broker execution service's DPoP key: the clearing's tokens it gets by exchanging a
    #: partner's (the arranger's) token are bound to it (the trust profile's default binding).
    dpop: DpopKey = field(default_factory=DpopKey)


def _wire(
    a: Party,
    b: Party,
    c: Party,
    store_dir: Path,
    options: Options,
    processes: Processes,
    state: Run,
) -> Wiring:
    store_dir.mkdir(parents=True)
    broker_key, clearing_key = new_key(), new_key()

    alice = Pending(a, {"op": "user", "username": "alice", "name": "Alice Trader",
                        "lei": NORTHWIND, "password": ALICE_PASSWORD})  # fmt: skip
    orders = a.client(
        "Arranger order service", SCOPES, ARRANGER_ORDERS, BROKER_EXECUTION,
        grant_types=["authorization_code", EXCHANGE], redirect_uris=[REDIRECT_URI],
        authorization_details_types=["trade_instruction"],
    )  # fmt: skip
    # the broker's services ask the arranger about the tokens it issued there (RFC 7662)
    broker_in = a.client(
        "broker reference services", "order:create", BROKER_EXECUTION,
        resource_server_for=[BROKER_EXECUTION], key=broker_key,
    )  # fmt: skip
    a_auditor = a.client("compliance", "audit:query", "/audit")
    admin = a.client("mandate desk", "mandate:view mandate:administer", "/mandates")
    # the broker's execution service exchanges the arranger's tokens it is called with
    execution = b.client(
        "Broker execution service", SCOPES, BROKER_EXECUTION, CLEARING_SETTLEMENT,
        resource_server_for=[BROKER_EXECUTION], grant_types=[EXCHANGE, "client_credentials"],
        authorization_details_types=["trade_instruction"],
    )  # fmt: skip
    desk = b.client("Broker middle office", BROKER_DESK, BROKER_EXECUTION)
    supervisor = b.client("Broker supervisor", "allocation:approve", BROKER_EXECUTION)
    broker_pdp = b.client("broker reference services", "decision:evaluate", "/access/v1",
                          key=broker_key)  # fmt: skip
    clearing_in = b.client(
        "clearing reference services", "settlement:submit", CLEARING_SETTLEMENT,
        resource_server_for=[CLEARING_SETTLEMENT], key=clearing_key,
    )  # fmt: skip
    b_auditor = b.client("compliance", "audit:query", "/audit")
    ops = c.client("Clearing operations", CLEARING_OPS, CLEARING_SETTLEMENT)
    clearing_pdp = c.client("clearing reference services", "decision:evaluate", "/access/v1",
                            key=clearing_key)  # fmt: skip
    c_auditor = c.client("compliance", "audit:query", "/audit")
    batches: dict[Party, list[Pending]] = {
        a: [alice, orders, broker_in, a_auditor, admin],
        b: [execution, desk, supervisor, broker_pdp, clearing_in, b_auditor],
        c: [ops, clearing_pdp, c_auditor],
    }
    b_at_a, c_at_b = a.subscription_client(b), b.subscription_client(c)
    batches[a].append(b_at_a)
    batches[b].append(c_at_b)
    parallel(*(lambda p=p, batch=batch: p.operate(batch) for p, batch in batches.items()))

    # the broker accepts the arranger's tokens to exchange them for the clearing, settlement only.
    # token_binding: the default (sender_constrained): the execution service exchanges with a DPoP
    # proof and presents the clearing's token with proofs of that key (the reference services
    # verify them); examples/three_party shows mTLS binding as well
    settlement_only = {
        "allowed_scopes": ["settlement:submit"],
        "allowed_audiences": [CLEARING_SETTLEMENT],
    }
    parallel(
        lambda: b.d.operate([b.trust(a, ARRANGER, b_at_a.client_id, **settlement_only)]),
        lambda: c.d.operate([c.trust(b, BROKER, c_at_b.client_id, **settlement_only)]),
    )
    # each service its own store (trades-<service>.db beside this name), shared by the two
    # processes: the broker's runs execution and allocation, the clearing's settlement and
    # reporting; each hands its own services' events to the other stores
    common = {
        "database_url": f"sqlite+aiosqlite:///{store_dir / 'trades.db'}",
        "allow_insecure_loopback": "true",
        **({"nats_url": options.nats_url, "nats_prefix": "tpdemo"} if options.nats_url else {}),
    }
    broker_ref = ReferenceService(
        "broker-reference", store_dir, {
            **common,
            "issuer": f"{b.issuer}/reference",
            "services": "execution,allocation",
            "event_key_file": str(store_dir / "broker-events.pem"),
            "audience": BROKER_EXECUTION,
            "trusted_issuers": f"{a.issuer} {b.issuer}",
            "pdp": b.issuer, "pdp_client_id": broker_pdp.client_id,
            "introspection": a.issuer, "introspection_client_id": broker_in.client_id,
            "client_key_file": str(write_key(broker_key, store_dir / "broker-client.pem")),
        }, options.log_level,
    )  # fmt: skip
    clearing_ref = ReferenceService(
        "clearing-reference", store_dir, {
            **common,
            "issuer": f"{c.issuer}/reference",
            "services": "settlement,reporting",
            "event_key_file": str(store_dir / "clearing-events.pem"),
            "audience": CLEARING_SETTLEMENT,
            "trusted_issuers": f"{b.issuer} {c.issuer}",
            "pdp": c.issuer, "pdp_client_id": clearing_pdp.client_id,
            "introspection": b.issuer, "introspection_client_id": clearing_in.client_id,
            "client_key_file": str(write_key(clearing_key, store_dir / "clearing-client.pem")),
        }, options.log_level,
    )  # fmt: skip
    # both start at once on the same store files: the schema creation is safe for that
    for service in (broker_ref, clearing_ref):
        processes.add(service.start())
    for service in (broker_ref, clearing_ref):
        service.wait_ready()
    state.show("arranger", f"Alice (Northwind AM); order service {orders.client_id}")
    state.show("broker", "execution service, middle office, supervisor; trusts the arranger (SSF)")
    state.show("clearing", "operations; trusts the broker (SSF)")
    state.show("broker reference services", f"{broker_ref.url} (execution, allocation)")
    state.show(
        "clearing reference services",
        f"{clearing_ref.url} (settlement, exceptions)"
        + (
            f", events to NATS {options.nats_url}" if options.nats_url else ", events in the outbox"
        ),
    )
    state.facts["services"] = {"broker": broker_ref.url, "clearing": clearing_ref.url}
    return Wiring(
        orders.auth(), execution.auth(), desk.auth(), supervisor.auth(), ops.auth(), admin.auth(),
        broker_in.auth(), clearing_in.auth(),
        {"arranger": a_auditor.auth(), "broker": b_auditor.auth(), "clearing": c_auditor.auth()},
        broker_ref, clearing_ref,
    )  # fmt: skip


def _trade_to_approval(
    state: Run, b: Party, w: Wiring, broker_token: str, *, four_eyes: bool
) -> str:
    """Order (with the arranger's delegated token), execution, allocation proposed by the middle
    office and approved by the supervisor (four eyes) at the broker's reference services."""
    url = w.broker_ref.url
    trade = ok(call(f"{url}/orders", broker_token, ORDER, _key()), 201, "order")
    trade_id = str(trade["trade_id"])
    desk = b.own_token(w.desk, "trade:execute allocation:propose", BROKER_EXECUTION)
    ok(call(f"{url}/trades/{trade_id}/execute", desk, {}, _key()), 200, "execute")
    body = {"allocations": ALLOCATIONS}
    ok(call(f"{url}/trades/{trade_id}/allocation", desk, body, _key()), 200, "propose")
    if four_eyes:
        # four eyes, twice: no token carries both propose and approve (the broker's token policy),
        # and the proposer's own approval is refused by the service
        both = _token_refusal(b, w.desk, "allocation:propose allocation:approve")
        state.show("one token to propose and approve", f"400 {both} (policy token.four_eyes)")
        own = b.own_token(w.desk, "allocation:approve", BROKER_EXECUTION)
        same = call(f"{url}/trades/{trade_id}/allocation/approve", own, {}, _key())
        expect(same.status_code == 403 and same.json()["title"] == "four-eyes", same.text)
        state.show("the proposer approving its own allocation", "403 four-eyes")
    boss = b.own_token(w.supervisor, "allocation:approve", BROKER_EXECUTION)
    ok(call(f"{url}/trades/{trade_id}/allocation/approve", boss, {}, _key()), 200, "approve")
    return trade_id


def _token_refusal(party: Party, client: PrivateKeyJwt, scope: str) -> str:
    data, headers = {"grant_type": "client_credentials", "scope": scope}, dict[str, str]()
    data["resource"] = BROKER_EXECUTION
    client.apply(data, headers)
    answer = httpx.post(f"{party.issuer}/token", data=data, headers=headers, timeout=10)
    expect(answer.status_code == 400, f"{scope}: {answer.status_code} {answer.text[:200]}")
    return str(answer.json()["error"])


def _lifecycle(state: Run, a: Party, b: Party, c: Party, w: Wiring) -> None:
    facts = state.facts
    with state.step("1", "Alice consents at the arranger (code + PKCE) -> mandate M"):
        alice = consent(a, w.orders)["access_token"]
        mandate = claims_of(alice).get("mandate")
        expect(isinstance(mandate, dict), "Alice's token rests on no mandate")
        assert isinstance(mandate, dict)
        facts["mandate"] = mandate
        state.show("mandate", f"{mandate['id']} v{mandate['version']} (grantor Northwind AM)")

    def to_broker() -> str:
        return a.exchange(
            w.orders, alice, resource=BROKER_EXECUTION, scope=SCOPES,
            authorization_details=json.dumps([NARROWED]),
        )  # fmt: skip

    def to_clearing(token: str) -> str:
        return b.exchange(
            w.execution, token, w.dpop, resource=CLEARING_SETTLEMENT, scope="settlement:submit"
        )

    def delegate() -> tuple[str, str]:
        token = to_broker()
        return token, to_clearing(token)

    with state.step("2", "token exchange at the arranger: broker audience, act, txn"):
        t1 = to_broker()
        c1 = claims_of(t1)
        txn = str(c1["txn"])
        expect(c1["act"]["sub"] == w.orders.client_id, "act is not the order service")
        expect(c1["mandate"] == mandate, "the mandate was not kept")
        expect(c1["authorization_details"] == [NARROWED], "the details were not narrowed")
        facts["txn"] = txn
        state.show("txn", txn)
        state.show("broker token", "act = arranger order service, narrowed to 1m EUR, mandate M")

    with state.step("3", "broker executes: order, execution, allocation (four eyes)"):
        trade_id = _trade_to_approval(state, b, w, t1, four_eyes=True)
        state.show("trade", f"{trade_id} allocation_approved")

    with state.step("4", "exchange at the broker (act broker -> arranger), settlement"):
        t2 = to_clearing(t1)
        c2 = claims_of(t2)
        expect(c2["txn"] == txn and c2["prv"]["jti"] == c1["jti"], "the chain did not travel")
        expect(c2["scope"] == "settlement:submit", "the clearing token is not narrowed")
        expect(c2.get("cnf", {}).get("jkt") == w.dpop.jkt, "the clearing token is not DPoP-bound")
        facts["clearing_token_binding"] = sorted(c2["cnf"])
        state.show("clearing token", "settlement:submit only, act broker -> arranger, same txn,"
                   " DPoP-bound (cnf.jkt)")  # fmt: skip
        url = w.clearing_ref.url
        key = _key()
        body = {"instructions": INSTRUCTIONS}
        settle = f"{url}/trades/{trade_id}/settlement"
        submitted = ok(call(settle, t2, body, key, w.dpop), 200, "submit")
        retry = call(settle, t2, body, key, w.dpop)
        expect(retry.headers.get("idempotency-replayed") == "true", "the retry was not a replay")
        expect(retry.json() == submitted, "the retry did not return the stored result")
        state.show("retry with the same Idempotency-Key", "the stored result (replayed)")
        ops = c.own_token(w.ops, CLEARING_OPS, CLEARING_SETTLEMENT)
        confirm = {"outcome": "settled"}
        ok(call(f"{url}/trades/{trade_id}/settlement/confirm", ops, confirm, _key()), 200, "settle")
        report = ok(call(f"{url}/trades/{trade_id}", ops), 200, "report")
        expect(report["state"] == "settled", f"trade is {report['state']}")
        facts["trade"] = {"trade_id": trade_id, "state": report["state"], "txn": txn}
        state.show("trade", f"{trade_id} [green]settled[/]")

    with state.step("5", "second trade: mandate M revoked before settlement"):
        facts["exception"] = _step5(state, a, b, c, w, delegate, mandate)

    with state.step("6", "the chain of authority of the first transaction"):
        parties = {"arranger": a, "broker": b, "clearing": c}
        chain = {
            name: poll_ledger(p, w.auditors[name], txn, want)
            for name, p, want in (
                ("arranger", a, "oauth:token:issued"),
                ("broker", b, "policy:decision:allowed"),
                ("clearing", c, "policy:decision:allowed"),
            )
        }
        events = ledgers.reference_events(
            c.own_token(w.ops, CLEARING_OPS, CLEARING_SETTLEMENT), w.clearing_ref.url,
            {f"{b.issuer}/reference": w.broker_ref.url, f"{c.issuer}/reference": w.clearing_ref.url},
        )  # fmt: skip
        facts["events"] = ledgers.event_summary(events, w.clearing_ref)
        names = {
            w.orders.client_id: "arranger order service",
            w.execution.client_id: "broker execution service",
            w.desk.client_id: "broker middle office",
            w.supervisor.client_id: "broker supervisor",
            w.ops.client_id: "clearing operations",
            str(claims_of(alice)["sub"]): "Alice",
            **{p.issuer: name for name, p in parties.items()},
        }
        tree = ledgers.authority_tree(txn, mandate, claims_of(alice), chain, events, parties, names)
        facts["tree"] = tree
        state.console.print()
        state.console.print(ledgers.rich_tree(tree))
        state.console.print("   [dim]✓ = with its inclusion proof against the signed checkpoint[/]")

    with state.step("7", "each ledger exported and verified offline"):
        facts["ledgers"] = dict(
            zip(
                parties,
                parallel(*(lambda p=p: ledgers.export_and_verify(p.d) for p in parties.values())),
                strict=True,
            )
        )
        for name, result in facts["ledgers"].items():
            expect(result["ok"], f"{name} ledger: {result['failures']}")
            state.show(name, f"{result['entries']} entries, checkpoint {result['tree_size']}: "
                       "[green]verified[/]")  # fmt: skip


def poll_ledger(party: Party, auditor: PrivateKeyJwt, txn: str, want: str) -> list[dict[str, Any]]:
    """The transaction's entries once one of ``want`` is integrated (every 0.2 s)."""
    found: list[dict[str, Any]] = []

    def has() -> bool:
        found[:] = party.ledger(auditor, txn)
        return any(e["entry"]["type"] == want for e in found)

    poll(has, 15, f"{party.name}: no {want} in the ledger", step=0.2)
    return found


def _step5(
    state: Run,
    a: Party,
    b: Party,
    c: Party,
    w: Wiring,
    delegate: Callable[[], tuple[str, str]],
    mandate: dict[str, Any],
) -> dict[str, Any]:
    t1, t2 = delegate()
    txn = str(claims_of(t1)["txn"])
    trade_id = _trade_to_approval(state, b, w, t1, four_eyes=False)
    state.show("trade", f"{trade_id} allocation_approved (txn {txn})")
    # a SET goes only to the streams that exist: wait until the broker has subscribed
    poll(lambda: a.streams() > 0, 30, "the broker did not subscribe to the arranger's SSF")
    admin = a.own_token(w.mandate_admin, "mandate:view mandate:administer", "/mandates")
    t0 = time.monotonic()
    ok(call(f"{a.issuer}/mandates/{mandate['id']}/revoke", admin, {"reason": "withdrawn"}), 200,
       "revoke the mandate")  # fmt: skip
    poll(lambda: not a.active(w.broker_introspect, t1), 5, "still active at the arranger")
    poll(lambda: not b.active(w.clearing_introspect, t2), 10, "still active at the broker")
    ssf = round(time.monotonic() - t0, 3)
    state.show("mandate M", "[red]revoked[/] at the arranger")
    state.show("derived tokens", f"inactive at the arranger and, by SSF, at the broker ({ssf} s)")
    url = w.clearing_ref.url
    body = {"instructions": INSTRUCTIONS}
    refused = call(f"{url}/trades/{trade_id}/settlement", t2, body, _key(), w.dpop)
    problem = refused.json()
    expect(
        refused.status_code == 403 and problem.get("title") == "settlement-exception",
        f"settlement after revocation: {refused.status_code} {refused.text[:300]}",
    )
    exception = problem["exception"]
    state.show("settlement", f"403 settlement-exception ({exception['reason']})")
    decision_id = problem.get("decision_id")
    deny = _deny_in_ledger(c, w.auditors["clearing"], txn, decision_id)
    state.show("clearing ledger", f"deny {deny['action']} ({', '.join(deny['reason_ids'])})")
    ops = c.own_token(w.ops, CLEARING_OPS, CLEARING_SETTLEMENT)
    listed = ok(call(f"{url}/exceptions?status=open", ops), 200, "exceptions")
    expect(
        any(e["exception_id"] == exception["exception_id"] for e in listed["exceptions"]),
        "the exception is not listed",
    )
    resolution = {"action": "cancel", "note": "mandate withdrawn; trade cancelled"}
    resolve_url = f"{url}/exceptions/{exception['exception_id']}/resolve"
    resolved = ok(call(resolve_url, ops, resolution), 200, "resolve")
    report = ok(call(f"{url}/trades/{trade_id}", ops), 200, "report")
    expect(report["state"] == "cancelled", f"trade is {report['state']} after cancel")
    state.show("operator", f"exception {exception['exception_id']} resolved: cancel -> "
               "trade [yellow]cancelled[/]")  # fmt: skip
    return {
        "trade_id": trade_id,
        "txn": txn,
        "status": refused.status_code,
        "code": problem["title"],
        "reason": exception["reason"],
        "exception_id": exception["exception_id"],
        "decision_id": decision_id,
        "deny": deny,
        "ssf_seconds": ssf,
        "resolution": resolved.get("resolution", "cancel"),
        "resolved_status": resolved.get("status"),
        "state": report["state"],
    }


def _deny_in_ledger(
    party: Party, auditor: PrivateKeyJwt, txn: str, decision_id: str | None
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def has() -> bool:
        for e in party.ledger(auditor, txn):
            entry = e["entry"]
            if entry["type"] == "policy:decision:denied" and entry["event_id"] == decision_id:
                found.update(
                    action=(e.get("payload") or {}).get("action"),
                    reason_ids=entry.get("reason_ids") or [],
                    decision_id=decision_id,
                    proved=bool(e.get("inclusion_proof")),
                )
                return True
        return False

    poll(has, 15, "no deny in the clearing's ledger", step=0.2)
    return found
