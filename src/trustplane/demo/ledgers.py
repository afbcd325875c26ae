"""After the lifecycle: the reference services' signed events (verified), the chain of authority
of one transaction as a tree, and each deployment's ledger exported and verified offline."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
from rich.tree import Tree

from trustplane.audit.parallel_verify import verify_export_file
from trustplane.demo.parties import Party, claims_of
from trustplane.demo.processes import DemoFailed, Deployment, ReferenceService, expect
from trustplane.reference.events import EventRefused, verify_event
from trustplane.reference.machine import OWNERS

Node = dict[str, Any]  # {"label": str, "kind": str, "children": [Node, ...]}


def node(kind: str, label: str, *children: Node) -> Node:
    return {"kind": kind, "label": label, "children": list(children)}


def reference_events(token: str, url: str, services: dict[str, str]) -> list[dict[str, Any]]:
    """Every event of the services (``GET /events``: the reporting store's feed of every owner's
    events), each verified with the JWKS of the process named by its ``iss`` (``verify_event``:
    ES256, ``typ``, ``kid``, ``iss``)."""
    answer = httpx.get(
        f"{url}/events", params={"after": 0}, headers={"Authorization": f"Bearer {token}"},
        timeout=15,
    )  # fmt: skip
    expect(answer.status_code == 200, f"events: {answer.status_code} {answer.text[:200]}")
    jwks = {iss: httpx.get(f"{base}/jwks", timeout=10).json() for iss, base in services.items()}
    verified = []
    for event in answer.json()["events"]:
        issuer = str(claims_of(event["jws"]).get("iss"))
        expect(issuer in jwks, f"an event from an unknown service {issuer}")
        try:
            verified.append(verify_event(event["jws"], jwks[issuer], issuer=issuer))
        except EventRefused as exc:
            raise DemoFailed(f"event {event['id']} does not verify: {exc}") from None
    return verified


def event_summary(events: list[dict[str, Any]], service: ReferenceService) -> dict[str, Any]:
    """How many events there are, all verified; with NATS, how many JetStream acknowledged (each
    owner's publisher marks a row of its outbox only after the ack), polled until the owners'
    outboxes are drained."""
    summary: dict[str, Any] = {"count": len(events), "verified": len(events)}
    summary["types"] = sorted({str(e["type"]) for e in events})
    if "nats_url" in service.settings:
        databases = [service.store_dir / f"trades-{owner}.db" for owner in OWNERS]

        def published() -> int:
            query = "SELECT count(*) FROM ref_outbox WHERE published_at IS NOT NULL"
            total = 0
            for database in databases:
                with sqlite3.connect(database) as db:
                    total += int(db.execute(query).fetchone()[0])
            return total

        deadline = time.monotonic() + 10
        while published() < len(events) and time.monotonic() < deadline:
            time.sleep(0.1)
        summary["published_to_nats"] = published()
    return summary


def _short(value: Any, size: int = 8) -> str:
    text = str(value)
    return text if len(text) <= size + 2 else text[:size] + "…"


def _who(envelope: dict[str, Any], names: dict[str, str]) -> str:
    sub, client = str(envelope.get("sub")), str(envelope.get("client_id"))
    if sub in names and client in names and sub != client:
        return f"{names[client]} for {names[sub]}"
    return names.get(sub) or names.get(client) or _short(sub, 16)


def _entry_label(entry: dict[str, Any], names: dict[str, str]) -> tuple[str, str]:
    """(kind, label) of one ledger entry."""
    e, payload = entry["entry"], entry.get("payload") or {}
    kind = str(e["type"])
    proof = " ✓" if entry.get("inclusion_proof") else ""
    if kind.startswith("policy:decision:"):
        verdict = "allow" if kind.endswith("allowed") else "deny"
        reasons = ", ".join(e.get("reason_ids") or [])
        bundle = e.get("policy_version") or payload.get("bundle_version") or ""
        label = f"decision: {verdict} {payload.get('action', '?')} ({reasons})"
        return "decision", label + (f" bundle {_short(bundle, 12)}" if bundle else "") + proof
    exchange = payload.get("exchange")
    if kind == "oauth:token:issued" and isinstance(exchange, dict):
        subject, derived = exchange["subject_token"], exchange["derived_token"]
        actors = " → ".join(names.get(a, _short(a, 12)) for a in e.get("actor_chain") or [])
        return "exchange", (
            f"exchange: token {_short(subject['jti'])} ({names.get(subject['iss'], subject['iss'])})"
            f" → token {_short(derived['jti'])}, act {actors}{proof}"
        )
    if kind == "oauth:token:issued":
        return "token", f"token issued {_short(e.get('event_id'))}{proof}"
    return "entry", kind + proof


def authority_tree(
    txn: str,
    mandate: dict[str, Any],
    origin: dict[str, Any],
    chain: dict[str, list[dict[str, Any]]],
    events: list[dict[str, Any]],
    parties: dict[str, Party],
    names: dict[str, str],
) -> Node:
    """person → mandate → per deployment: tokens, exchanges, decisions → the trade's events.
    ``origin``: the claims of the person's own token (issued before the transaction began);
    ``names``: display names of issuers, clients and subjects."""
    branches = []
    for name, entries in chain.items():
        leaves = [node(*_entry_label(e, names)) for e in entries]
        if name == "arranger":
            who = names.get(str(origin.get("client_id")), "?")
            leaves.insert(0, node(
                "token", f"token {_short(origin.get('jti'))} for Alice, client {who} "
                "(authorization code + PKCE + consent)",
            ))  # fmt: skip
        branches.append(node("deployment", f"{name} {parties[name].issuer}", *leaves))
    trade_ids = {e["trade_id"] for e in events if (e.get("envelope") or {}).get("txn") == txn}
    trade_events = [
        node("event", f"{e['type']} → {e['state']} by {_who(e['envelope'], names)}")
        for e in events
        if e["trade_id"] in trade_ids
    ]
    branches.append(node("events", "reference services' signed events (verified)", *trade_events))
    mandate_node = node(
        "mandate", f"mandate {mandate['id']} v{mandate['version']} (consent at the arranger)",
        *branches,
    )  # fmt: skip
    person = node("person", "Alice Trader (alice), Northwind AM", mandate_node)
    return node("transaction", f"transaction {txn}", person)


_STYLE = {
    "transaction": "bold",
    "person": "bold magenta",
    "mandate": "magenta",
    "deployment": "bold cyan",
    "exchange": "yellow",
    "token": "yellow",
    "decision": "green",
    "events": "bold blue",
    "event": "blue",
}


def rich_tree(root: Node) -> Tree:
    def add(parent: Tree, item: Node) -> None:
        style = _STYLE.get(item["kind"], "")
        if item["kind"] == "decision" and ": deny" in item["label"]:
            style = "red"
        branch = parent.add(f"[{style}]{item['label']}[/]" if style else item["label"])
        for child in item["children"]:
            add(branch, child)

    tree = Tree(f"[{_STYLE['transaction']}]{root['label']}[/]")
    for child in root["children"]:
        add(tree, child)
    return tree


def export_and_verify(d: Deployment) -> dict[str, Any]:
    """Export the ledger up to its latest signed checkpoint (what ``trustplane audit export`` writes,
    with the checkpoint and the log's verifier key), then verify the export offline with the
    verifier behind ``trustplane audit verify``: the checkpoint's signature, every leaf, the root.
    Nothing from the server is trusted but the key."""
    out = d.workdir / "exports"
    out.mkdir(exist_ok=True)
    export, checkpoint = out / f"{d.name}.jsonl", out / f"{d.name}.checkpoint"
    (made,) = d.operate([{"op": "export", "out": str(export), "checkpoint": str(checkpoint)}])
    report = verify_export_file(export, checkpoint.read_text(), made["key"], workers=1)
    return {
        "ok": report.ok,
        "entries": made["entries"],
        "tree_size": made["tree_size"],
        "proved": report.proved,
        "failures": report.failures,
        "export": str(export),
        "checkpoint": str(checkpoint),
        "verifier_key": made["key"],
    }


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2))
