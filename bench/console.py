#!/usr/bin/env python3
"""Console page benchmark (issue 16): server time to render the Overview, a mandate search and a
transaction page with ``--entries`` ledger entries (default 1,000,000) and ``--mandates`` mandates
(default 100,000) in the database, p50 / p95 per page. Aim: p95 <= 150 ms.

The data goes in through a BULK PATH, said so in the output: ledger leaves and tree nodes computed
in Python exactly as the sequencer does (the bench/ledger.py way), one signed checkpoint at the end;
mandates, their versions and changes as rows. Entries are spread over the last 30 days (the Overview
counts the last 24 hours), in transactions of 8 events (consent, issue, exchange, decisions,
refusals), so a transaction page shows a full chain with a proof per entry.

"Server time" is the whole request through the real app (routing, session cookie, the services,
the database, Jinja2) in process, over httpx's ASGI transport: no network, no browser.

  python bench/console.py                           # SQLite, and PostgreSQL when it answers
  python bench/console.py --db sqlite --entries 200000 --mandates 20000

Numbers from a shared, loaded 2-vCPU machine are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ledger import _bulk_insert, fresh_database, pct, row  # bench/ledger.py

from trustplane.app import Services, create_app
from trustplane.audit import merkle
from trustplane.audit.canonical import entry_parts
from trustplane.audit.note import Checkpoint
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.authorize.sealing import Sealer
from trustplane.logging import configure_logging
from trustplane.settings import Settings, decode_kek, new_kek_text

ISSUER = "https://as.northwind.example"
LEI = "5493001KJTIIGC8Y1R12"
GRANTORS = ["529900T8BM49AURSDO55", "5493001KJTIIGC8Y1R12"]
CLIENTS = [f"tp-client-{n:03d}" for n in range(100)]
CHUNK = 20_000
DAY_MS = 86_400_000
TXN = 8
#: one transaction's events: (type, decision, reason, actor chain)
SHAPE = [
    (AuditEventType.CONSENT_GRANTED, "allow", None, ()),
    (AuditEventType.TOKEN_ISSUED, "allow", None, ()),
    (AuditEventType.TOKEN_ISSUED, "allow", None, ("oms",)),
    (AuditEventType.POLICY_DECISION_ALLOWED, "allow", "within_limits", ()),
    (AuditEventType.POLICY_DECISION_DENIED, "deny", "limit_exceeded", ()),
    (AuditEventType.TOKEN_REFUSED, "deny", "invalid_grant", ()),
    (AuditEventType.TOKEN_ISSUED, "allow", None, ()),
    (AuditEventType.TOKEN_REVOKED, None, None, ()),
]


def event(n: int, now_ms: int, entries: int) -> AuditEvent:
    type_, decision, reason, actors = SHAPE[n % TXN]
    txn = n // TXN
    return AuditEvent(
        type=type_,
        issuer=ISSUER,
        subject=f"u_{txn % 5000:05d}",
        client_id=CLIENTS[txn % len(CLIENTS)],
        actor_chain=actors,
        scopes=("order:create",),
        mandate_id=f"mdt_{txn % 100_000:024x}",
        mandate_version=1,
        jti=f"jti-{n}",
        transaction_id=f"txn-{txn}",
        decision=decision,
        reason=reason,
        payload={"n": n},
        # oldest first, the newest at "now": the last 24 h hold about 1/30 of the entries
        time=now_ms - (entries - n) * (30 * DAY_MS // entries),
    )


async def bulk_ledger(svc: Services, entries: int) -> None:
    ledger, db = svc.ledger, svc.db
    signer = await ledger.signer()
    await ledger.integrate_all()
    async with db.read() as conn:
        size = (await conn.execute(text("SELECT tree_size FROM audit_log_state"))).scalar() or 0
        frontier = {}
        for i in merkle.frontier_ids(size):
            h = await conn.execute(text("SELECT hash FROM audit_tree WHERE id = :i"), {"i": i})
            frontier[i] = bytes(h.scalar())
    builder = merkle.TreeBuilder(size, frontier)
    now_ms, started = time.time_ns() // 1_000_000, time.perf_counter()
    for first in range(0, entries, CHUNK):
        leaves, nodes, payloads = [], [], []
        for n in range(first, min(entries, first + CHUNK)):
            index = builder.size
            entry, payload, salt = entry_parts(event(n, now_ms, entries))
            e = orjson.loads(entry)
            leaves.append((index, entry.decode(), e["event_id"], e["type"], e["time"],
                           e["subject"], e["client_id"], None, e["transaction_id"], now_ms // 1000))  # fmt: skip
            nodes.extend(builder.append(merkle.leaf_hash(entry)))
            payloads.append((index, payload.decode(), salt))
        async with db.transaction() as conn:
            await _bulk_insert(conn, leaves, nodes, payloads)
        print(f"\r  ledger bulk path: {first + len(leaves):,} / {entries:,}", end="", flush=True)
    root = builder.root()
    note = signer.sign(Checkpoint(ledger.origin, builder.size, root).body())
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE audit_log_state SET tree_size = :n, root = :r, updated_at = :t"),
            {"n": builder.size, "r": root, "t": now_ms // 1000},
        )
        await conn.execute(
            text("INSERT INTO audit_checkpoints (tree_size, root, note, created_at) "
                 "VALUES (:n, :r, :note, :t)"),
            {"n": builder.size, "r": root, "note": note, "t": now_ms // 1000},
        )  # fmt: skip
    print(f"\r  ledger: {entries:,} entries through the BULK PATH (not the sequencer) in "
          f"{time.perf_counter() - started:.0f} s; tree size {builder.size:,}")  # fmt: skip


async def bulk_mandates(svc: Services, count: int) -> None:
    now, started = int(time.time()), time.perf_counter()
    for first in range(0, count, CHUNK):
        heads, versions, changes = [], [], []
        for n in range(first, min(count, first + CHUNK)):
            mid = f"mdt_{n:024x}"
            client, grantor = CLIENTS[n % len(CLIENTS)], GRANTORS[n % 2]
            status = ("active", "active", "active", "suspended", "revoked")[n % 5]
            until = now + (n % 400) * 86400 if n % 7 else None
            created = now - (count - n) * 60
            heads.append((mid, 1, status, None, grantor, client, created, until, created, created,
                          None, 1))  # fmt: skip
            versions.append((mid, 1, grantor, f"u_{n % 5000:05d}", client, LEI, "order:create",
                             "[]", "0" * 64, created, until, "mandate", None,
                             "grantor or administrator", "desk-head", created, "bench", created))  # fmt: skip
            changes.append((mid, 1, "created", status, "bench", None, created))
        async with svc.db.transaction() as conn:
            await _rows(conn, "mandates", heads, 12)
            await _rows(conn, "mandate_versions", versions, 18)
            await _rows(conn, "mandate_changes", changes, 7,
                        "(mandate_id, version, action, status, actor, reason, at)")  # fmt: skip
        print(f"\r  mandates bulk path: {first + len(heads):,} / {count:,}", end="", flush=True)
    async with svc.db.transaction() as conn:
        await conn.execute(text("ANALYZE"))
    print(f"\r  mandates: {count:,} (with versions and changes) through the BULK PATH in "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip


async def _rows(
    conn: Any, table: str, rows: list[tuple[Any, ...]], width: int, cols: str = ""
) -> None:
    if conn.dialect.name == "postgresql":
        raw = (await conn.get_raw_connection()).driver_connection
        names = [c.strip() for c in cols.strip("()").split(",")] if cols else None
        await raw.copy_records_to_table(table, records=rows, columns=names)
        return
    marks = ", ".join("?" * width)
    sql = f"INSERT INTO {table} {cols} VALUES ({marks})"  # noqa: S608 - our own table names
    await conn.exec_driver_sql(sql, rows)


async def measure(svc: Services, samples: int, entries: int) -> None:
    txns = max(1, entries // TXN)
    app = create_app(svc.settings, services=_Started(svc))  # type: ignore[arg-type]
    user = await svc.authorization.users.add(
        "auditor", "Bench Auditor", GRANTORS[0], secrets.token_urlsafe(16)
    )
    sealer = Sealer(decode_kek(svc.settings.key_encryption_key.get_secret_value()))  # type: ignore[union-attr]
    cookie = sealer.seal("console-session", {"sid": "bench", "uid": user.user_id,
                                             "roles": ["auditor"], "at": int(time.time())}, 3600)  # fmt: skip
    pages = {
        "overview": "/console",
        "mandate search: by client id": f"/console/mandates?q={CLIENTS[7]}",
        "mandate search: grantor LEI + status": f"/console/mandates?q={GRANTORS[1]}&status=active",
        "mandate search: status only": "/console/mandates?status=suspended",
        "mandate search: by id": f"/console/mandates?q=mdt_{4242:024x}",
        "transaction page (8 entries, proofs)": "/console/transactions/txn-{}",
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER,
                                 cookies={"__Host-trustplane_console": cookie}) as http:  # fmt: skip
        for name, path in pages.items():
            times = []
            for i in range(samples + 3):
                url = path.format((i * 7919) % txns)  # another transaction each time
                t0 = time.perf_counter()
                answer = await http.get(url)
                elapsed = time.perf_counter() - t0
                assert answer.status_code == 200, (url, answer.status_code, answer.text[:500])
                if name.startswith("transaction"):  # a full chain, every entry proved
                    assert answer.text.count('class="proof ok">included') >= TXN, url
                elif name.startswith("mandate search"):
                    assert "/console/mandates/mdt_" in answer.text, url
                if i >= 3:  # the first requests warm caches and compile templates
                    times.append(elapsed)
            row(name, f"{pct(times, 0.5) * 1e3:.0f} / {pct(times, 0.95) * 1e3:.0f} ms",
                "p95 <= 150 ms" + (" (met)" if pct(times, 0.95) <= 0.150 else " (MISSED)"))  # fmt: skip


class _Started:
    def __init__(self, svc: Services) -> None:
        self._svc = svc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._svc, name)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


async def run(kind: str, entries: int, mandates: int, samples: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        url, drop = await fresh_database(kind, tmp)
        settings = Settings(issuer=ISSUER, database_url=url, data_dir=tmp,
                            key_encryption_key=new_kek_text(), log_level="error",
                            console_lei=LEI, console_roles={"auditor": ("auditor",)})  # fmt: skip
        svc = Services.build(settings)
        await svc.start()
        try:
            print(f"{kind}:")
            await bulk_ledger(svc, entries)
            await bulk_mandates(svc, mandates)
            print(f"  server time per page, p50 / p95 over {samples} requests:")
            await measure(svc, samples, entries)
        finally:
            await svc.stop()
            if drop is not None:
                await drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--mandates", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    configure_logging("error", "console")
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for kind in kinds:
        try:
            asyncio.run(run(kind, args.entries, args.mandates, args.samples))
        except OSError as exc:
            print(f"{kind}: skipped ({exc})")


if __name__ == "__main__":
    main()
