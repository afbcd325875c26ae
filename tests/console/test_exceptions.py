"""Settlement exceptions on the console, from the services' signed events in the ledger (ingested by
``POST /audit/events`` as the service's client): the Overview's count and list, the Exceptions page
(open, escalated, resolved), each role may read it, nobody resolves there."""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest

from tests.audit.test_ingest import audit, service
from tests.console.conftest import Console
from trustplane.reference.events import Envelope, EventSigner

pytestmark = pytest.mark.asyncio(loop_scope="module")
ROLES = {"operator": "olivia", "compliance": "carl", "auditor": "ada"}


def signed(
    signer: EventSigner, type_: str, trade: str, transition: str, txn: str, **data: Any
) -> str:
    envelope = Envelope(txn, "ops", "settlement-svc", (), {"id": "M-9", "version": 1})
    state = "exception" if type_ != "exception.resolved" else "allocation_approved"
    return signer.sign(type_, trade, transition, state, envelope, data)[1]


async def exceptions(console: Console) -> dict[str, str]:
    """Three exceptions of one service (open, escalated, resolved); trade id -> txn."""
    server = console.server
    kit, signer = await service(server)
    trades = {f"T-{n}-{secrets.token_hex(3)}": f"txn-{secrets.token_hex(5)}" for n in range(3)}
    lost = {"mandate": {"usable": False, "reason": "mandate_not_usable"}}
    events = []
    for trade, txn in trades.items():
        events.append(signed(signer, "settlement.exception", trade, "exception#1", txn, **lost))
    escalated, resolved = list(trades)[1:]
    events.append(
        signed(
            signer,
            "exception.escalated",
            escalated,
            "escalate#1",
            trades[escalated],
            exception_id=f"{escalated}.1",
            actor="ops",
            note="",
        )
    )
    events.append(signed(signer, "exception.resolved", resolved, "reconsent#1", trades[resolved],
                         exception_id=f"{resolved}.1", resolution="reconsent", note=""))  # fmt: skip
    token = await server.access_token(kit, scope="audit:ingest", resource=audit(server))
    answer = await server.http.post(
        "/audit/events", json={"events": events}, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.json()["recorded"] == 5, answer.text
    await server.services.ledger.integrate_all()
    return trades


def row(page: str, trade: str) -> str:
    found = re.search(rf"<tr>\s*<td class=\"code\">{re.escape(trade)}\.1.*?</tr>", page, re.S)
    assert found, page
    return found.group(0)


async def test_the_overview_counts_and_lists_unresolved_exceptions(console: Console) -> None:
    trades = await exceptions(console)
    opened, escalated, resolved = list(trades)
    page = (await console.agents["carl"].get("/console")).text
    count = re.search(r'id="exceptions-count">(\d+)<', page)
    assert count
    assert int(count.group(1)) >= 2
    listed = page.split('id="exceptions"', 1)[1].split("</table>", 1)[0]
    first = row(listed, opened)
    assert 'badge warning">open' in first
    assert "mandate_not_usable" in first
    assert f'href="/console/transactions/{trades[opened]}"' in first
    assert re.search(r'class="n">\d+ min<', first)
    assert 'badge critical">escalated' in row(listed, escalated)
    assert resolved not in listed  # resolved: not on the overview


async def test_the_exceptions_page_shows_unresolved_and_resolved(console: Console) -> None:
    trades = await exceptions(console)
    opened, escalated, resolved = list(trades)
    page = (await console.agents["ada"].get("/console/exceptions")).text
    unresolved = page.split('id="unresolved"', 1)[1].split("</table>", 1)[0]
    assert opened in unresolved
    assert escalated in unresolved
    assert resolved not in unresolved
    done = row(page.split('id="resolved"', 1)[1], resolved)
    assert 'badge active">resolved' in done
    assert "reconsent" in done
    assert "<form" not in page.split("<main", 1)[1]  # read-only: resolving is the service's


@pytest.mark.parametrize("role", list(ROLES))
async def test_each_role_reads_the_exceptions_page(console: Console, role: str) -> None:
    answer = await console.agents[ROLES[role]].get("/console/exceptions")
    assert answer.status_code == 200
    assert "<h1>Settlement exceptions</h1>" in answer.text
    assert 'href="/console/exceptions" aria-current="page"' in answer.text


async def test_anonymous_is_sent_to_sign_in(console: Console) -> None:
    async with console.agent() as anonymous:
        answer = await anonymous.get("/console/exceptions")
    assert (answer.status_code, answer.headers["location"]) == (303, "/console/login")


async def test_the_transitions_are_on_the_transaction_page(console: Console) -> None:
    trades = await exceptions(console)
    opened = next(iter(trades))
    page = (await console.agents["ada"].get(f"/console/transactions/{trades[opened]}")).text
    stages = dict(
        re.findall(r"<h2>(\w+)</h2>(.*?)</li>\s*(?=<li class=\"stage\">|</ol>)", page, re.S)
    )
    assert "settlement:exception" in stages["Transitions"]
    assert "mandate_not_usable, by ops" in stages["Transitions"]
    assert "not proved" not in page
