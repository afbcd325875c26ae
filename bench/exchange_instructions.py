#!/usr/bin/env python3
"""Instructions per request of the authorization server, in process, under valgrind's callgrind:
RFC 8693 token exchange as the reference lifecycle makes it (a subject token resting on a mandate,
with ``lei``, ``txn`` and ``authorization_details``, exchanged once per service audience: execution,
allocation, settlement, each narrowed to that service's scopes; the first exchange of a subject
token verifies its signature, the next two find it verified), client_credentials, and RFC 7662
introspection of an exchanged token (the same one again and again, and a new one each time), in the
same process.

``TokenEndpoint.handle`` and ``IntrospectionService.introspect`` are called directly (no HTTP),
``--concurrency`` requests in flight. The counters are dumped (``callgrind_control -d``) around each
block of ``--requests`` requests, and around an empty block (the dumps' own cost and the idle event
loop), which is subtracted; the forms are built before their block's first dump. All threads count
(on SQLite the group-commit writer's too; on PostgreSQL the database's own processes do not).

  PYTHONPATH=src:. valgrind --tool=callgrind --callgrind-out-file=/tmp/x/cg.%p \\
      python bench/exchange_instructions.py [--database-url postgresql://...]

Without valgrind it runs the same blocks and prints nothing but the block sizes (a dry run).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from exchange_inproc import _database, _drop  # the same scratch database, made and dropped

from tests.conftest import CLEARING, EXECUTION, LEI, ClientKit, make_settings, register_kit
from tests.mandates.conftest import DETAILS_TYPES, TRADE, terms
from trustplane.oauth.exchange import TOKEN_EXCHANGE
from trustplane.protocol.form import Form
from trustplane.protocol.tokens import issue_access_token
from trustplane.services import Services

ACCESS = "urn:ietf:params:oauth:token-type:access_token"
ALLOCATION = "https://allocation.example/api"
#: bench/lifecycle.py's desk: one exchange per service, narrowed to that service's scopes.
DESK = {
    EXECUTION: "order:create trade:execute",
    ALLOCATION: "allocation:propose",
    CLEARING: "settlement:submit settlement:confirm",
}
SCOPES = " ".join(DESK.values())
#: The blocks: introspection of one token again and again, introspection_new of a new one each time.
KINDS = ("exchange", "client_credentials", "introspection", "introspection_new")


class Bench:
    def __init__(self, services: Services, desk: ClientKit, mandate: dict[str, Any]) -> None:
        self.services, self.desk, self.mandate = services, desk, mandate

    def subject(self) -> str:
        """A token as the code grant issues it (bench/lifecycle.py's ``subject_tokens``)."""
        return issue_access_token(
            self.services.keys.ring, issuer=self.services.settings.issuer, subject="alice",
            client_id=self.desk.client_id, audience=EXECUTION, scopes=tuple(SCOPES.split()),
            lifetime=3600, extra={"lei": LEI, "mandate": self.mandate, "txn": f"txn-{uuid.uuid4()}",
                                  "authorization_details": [TRADE]},
        ).token  # fmt: skip

    def forms(self, kind: str, n: int) -> list[Form]:
        out = []
        subject = ""
        for i in range(n):
            single = self.desk.auth()
            if kind == "exchange":
                if i % 3 == 0:
                    subject = self.subject()
                resource = list(DESK)[i % 3]
                single.update(grant_type=TOKEN_EXCHANGE, subject_token=subject,
                              subject_token_type=ACCESS, scope=DESK[resource])  # fmt: skip
            elif kind == "client_credentials":
                resource = EXECUTION
                single.update(grant_type="client_credentials", scope="order:create")
            else:
                resource = ""
            out.append(Form(single, {"resource": [resource]} if resource else {}))
        return out

    async def introspection_forms(self, n: int, distinct: bool) -> list[Form]:
        """``n`` introspections of one exchanged token, or (``distinct``) of ``n`` tokens, each
        introspected once (the reference settlement service's pattern: the acting token, once)."""
        endpoint = self.services.token_endpoint
        tokens = [
            (await endpoint.handle(exchanged, None))["access_token"]
            for exchanged in self.forms("exchange", n if distinct else 1)
        ]
        return [Form({"token": tokens[i % len(tokens)], **self.desk.auth()}, {}) for i in range(n)]

    async def make(self, kind: str, n: int) -> list[Form]:
        if kind.startswith("introspection"):
            return await self.introspection_forms(n, kind == "introspection_new")
        return self.forms(kind, n)

    async def block(self, kind: str, forms: list[Form], concurrency: int) -> None:
        queue = iter(forms)
        if kind.startswith("introspection"):
            introspect = self.services.introspection.introspect

            async def worker() -> None:
                for form in queue:
                    assert (await introspect(form, None))["active"]

        else:
            handle = self.services.token_endpoint.handle

            async def worker() -> None:
                for form in queue:
                    await handle(form, None)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def _dump(label: str) -> None:
    if os.environ.get("TP_CALLGRIND"):
        subprocess.run(["callgrind_control", "-d", label, str(os.getpid())], check=True,
                       capture_output=True)  # fmt: skip
        time.sleep(0.2)


def _totals(pattern: str) -> dict[str, int]:
    """Instructions per dump, by the dump's label (``totals:`` of each ``cg.<pid>.<n>`` file)."""
    out: dict[str, int] = {}
    for path in glob.glob(pattern):
        text = Path(path).read_text()
        found = re.search(r"^desc: Trigger: (?:dump )?(.*)$", text, re.M)
        total = re.search(r"^summary: (\d+)", text, re.M)
        if found and total:
            out[found.group(1).strip()] = int(total.group(1))
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database-url", default="", help="PostgreSQL admin URL (a fresh db is made)")
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    url, name = await _database(args.database_url)
    data_dir = Path(tempfile.mkdtemp(prefix="tp-exchi-data-"))
    services = Services.build(make_settings(url, data_dir, log_level="error"))
    await services.start()
    try:
        desk = await register_kit(
            services, grant_types=["client_credentials", TOKEN_EXCHANGE], scope=SCOPES,
            allowed_resources=list(DESK), introspection_resources=[EXECUTION],
            authorization_details_types=DETAILS_TYPES,
        )  # fmt: skip
        made = await services.mandates.create(
            terms(desk.client_id, scopes=tuple(SCOPES.split())), actor="bench", accepted_by="alice"
        )
        bench = Bench(services, desk, {"id": made.id, "version": made.version})
        for kind in KINDS:  # warm up: every path taken, caches filled
            await bench.block(kind, await bench.make(kind, 90), args.concurrency)
        for r in range(args.rounds):
            for kind in ("empty", *KINDS):
                forms = [] if kind == "empty" else await bench.make(kind, args.requests)
                await asyncio.sleep(0.3)  # the writer's batches of the forms' setup are out
                _dump(f"before-{kind}-{r}")
                if forms:
                    await bench.block(kind, forms, args.concurrency)
                await asyncio.sleep(0.3)
                _dump(f"after-{kind}-{r}")
        print(f"blocks of {args.requests}, {args.rounds} rounds, pid {os.getpid()}", flush=True)
    finally:
        await services.stop()
        await _drop(args.database_url, name)


def report(pattern: str, n: int) -> None:
    totals = _totals(pattern)
    rounds = sorted({k.rsplit("-", 1)[1] for k in totals if k.startswith("after-")})
    for r in rounds:
        empty = totals[f"after-empty-{r}"]
        line = [f"round {r}: empty block {empty:,}"]
        for kind in KINDS:
            per = (totals[f"after-{kind}-{r}"] - empty) / n
            line.append(f"{kind} {per:,.0f}")
        print("  ".join(line))


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "report":
        report(sys.argv[2], int(sys.argv[3]))
    else:
        asyncio.run(main())
