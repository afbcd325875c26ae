"""The operator console's inputs with strings a store cannot hold (the console's rows of the table in
tests/test_unstorable_text.py, which covers the APIs): a NUL, a lone surrogate, over-long text, in each
query parameter, path segment and form field a signed-in person can send. Never a 500; a NUL is a 400
wherever it is (the entry refuses it in the target, the form reader in a body); nothing but the audit
ledger and the console's own sessions is written. On SQLite and PostgreSQL (PostgreSQL's ``text``
refuses a NUL, where SQLite stores it)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import func, select

from tests.console.conftest import Console
from tests.console.targets import new_mandate
from trustplane.schema import metadata

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class Bad:
    name: str
    form: str  # percent-encoded, for a query, a path or a form body
    nul: bool


BAD = [
    Bad("nul", "a%00b", True),
    Bad("surrogate", "a%ED%A0%80b", False),
    Bad("long", "x" * 8_000, False),
]

#: (id, method, target with ``@`` where the string goes, form body or None, role)
INPUTS = [
    ("mandates-q", "GET", "/console/mandates?q=@", None, "olivia"),
    ("mandates-status", "GET", "/console/mandates?status=@", None, "olivia"),
    ("mandate-path", "GET", "/console/mandates/@", None, "olivia"),
    ("client-path", "GET", "/console/clients/@", None, "olivia"),
    ("partner-path", "GET", "/console/partners/@", None, "olivia"),
    ("policy-diff", "GET", "/console/policy?old=@&new=b", None, "carl"),
    ("audit-subject", "GET", "/console/audit?subject=@", None, "ada"),
    ("audit-after", "GET", "/console/audit?after=@", None, "ada"),
    ("audit-export", "GET", "/console/audit/export?subject=@", None, "ada"),
    ("checkpoint-size", "GET", "/console/audit/checkpoint?size=@", None, "ada"),
    ("transaction-path", "GET", "/console/transactions/@", None, "ada"),
    ("confirm-target", "GET", "/console/confirm?action=mandate:revoke&target=@", None, "olivia"),
    ("suspend-reason", "POST", "/console/mandates/{mandate}/suspend", "reason=@", "olivia"),
    ("revoke-reason", "POST", "/console/mandates/{mandate}/revoke", "reason=@", "olivia"),
    ("action-target", "POST", "/console/mandates/@/suspend", "reason=r", "olivia"),
    ("action-verb", "POST", "/console/mandates/{mandate}/@", "reason=r", "olivia"),
    ("policy-version", "POST", "/console/policy/activate", "reason=r&version=@", "carl"),
    ("conformance-url", "POST", "/console/partners/p/conformance", "metadata_url=@", "olivia"),
]
#: written whatever the request asks: by the request on purpose (the ledger records refusals, the
#: session its last use) or by the server's own rounds meanwhile (surveillance reads the ledger)
ALWAYS_WRITTEN = ("audit", "console_sessions", "surveillance")


async def row_counts(console: Console) -> dict[str, int]:
    tables = [t for t in metadata.sorted_tables if not t.name.startswith(ALWAYS_WRITTEN)]
    async with console.services.db.transaction() as conn:
        return {
            t.name: (await conn.execute(select(func.count()).select_from(t))).scalar_one()
            for t in tables
        }


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.name)
@pytest.mark.parametrize(
    ("method", "target", "body", "person"), [i[1:] for i in INPUTS], ids=[i[0] for i in INPUTS]
)
async def test_a_string_the_store_cannot_hold_is_never_a_500_and_writes_nothing(
    console: Console, method: str, target: str, body: str | None, person: str, bad: Bad
) -> None:
    agent = console.agents[person]
    mandate_id = await new_mandate(console.services)
    target = target.replace("{mandate}", mandate_id).replace("@", bad.form)
    headers: dict[str, str] = {}
    content = None
    if body is not None:
        csrf = await console.csrf(agent)
        content = f"csrf={csrf}&confirmed=yes&{body.replace('@', bad.form)}".encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    before = await row_counts(console)

    answer = await agent.request(method, target, content=content, headers=headers)

    status = answer.status_code
    assert status < 500, (status, answer.text[:300])
    if bad.nul:
        assert status == 400, (status, answer.text[:300])
    if status == 303:  # done: a text the store can hold (a long reason is cut to 500 characters)
        assert not bad.nul
        history = await console.services.mandates.history(mandate_id)
        assert len(history.changes[-1].reason or "") <= 500
        return
    assert await row_counts(console) == before
    mandate = await console.services.mandates.get(mandate_id)
    assert mandate.status.value == "active"
