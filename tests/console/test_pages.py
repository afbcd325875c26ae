"""What the console pages show, from real data: the overview's counts and deny reasons, the mandate
search, versions side by side, a transaction's chain with every proof checked, the export verified
offline, policy diffs and a simulation, partner versions and the last conformance run, alerts."""

from __future__ import annotations

import html
import re
import secrets

import pytest

from tests.console.conftest import Console
from tests.console.targets import GRANTOR, new_bundle, new_client, new_mandate, new_partner
from trustplane.app import Services
from trustplane.audit.export_format import read_export
from trustplane.audit.export_verifier import verify_export
from trustplane.audit.sink import write_events
from trustplane.audit_events import AuditEvent, AuditEventType

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def emit(svc: Services, *events: AuditEvent) -> None:
    async with svc.db.transaction() as conn:
        await write_events(conn, list(events))
    await svc.ledger.integrate_all()


def event(type_: AuditEventType, **fields: object) -> AuditEvent:
    return AuditEvent(type=type_, issuer="http://127.0.0.1:8000", **fields)  # type: ignore[arg-type]


def number(page: str, name: str) -> int:
    found = re.search(rf'id="{name}">(\d+)<', page)
    assert found, page
    return int(found.group(1))


async def test_overview_counts_issues_exchanges_refusals_and_reasons(console: Console) -> None:
    agent = console.agents["ada"]
    await console.services.ledger.integrate_all()  # the sign-ins' own token issues
    before = (await agent.get("/console")).text
    await emit(
        console.services,
        event(AuditEventType.TOKEN_ISSUED, subject="s", client_id="c1"),
        event(AuditEventType.TOKEN_ISSUED, subject="s", client_id="c1"),
        event(AuditEventType.TOKEN_ISSUED, subject="s", client_id="c2", actor_chain=("c1",)),
        event(
            AuditEventType.TOKEN_REFUSED, client_id="c1", decision="deny", reason="invalid_grant"
        ),
        event(
            AuditEventType.TOKEN_REFUSED, client_id="c1", decision="deny", reason="invalid_grant"
        ),
        event(AuditEventType.POLICY_DECISION_DENIED, decision="deny", reason="limit_exceeded"),
    )
    after = (await agent.get("/console")).text
    assert number(after, "issued") - number(before, "issued") == 3
    assert number(after, "exchanges") - number(before, "exchanges") == 1
    assert number(after, "refused") - number(before, "refused") == 2
    assert number(after, "denied") - number(before, "denied") == 1
    reasons = after.split('id="reasons"', 1)[1].split("</table>", 1)[0]
    assert "invalid_grant" in reasons
    assert "limit_exceeded" in reasons


async def test_overview_lists_mandates_that_expire_soon(console: Console) -> None:
    from trustplane.mandates.model import MandateTerms

    svc = console.services
    client_id = await new_client(svc)
    import time

    terms = MandateTerms(
        grantor_lei=GRANTOR,
        grantee_client_id=client_id,
        scopes=("order:create",),
        effective_until=int(time.time()) + 3 * 86400,
    )
    soon = await svc.mandates.create(terms, actor="test", accepted_by="test")
    page = (await console.agents["ada"].get("/console")).text
    expiring = page.split('id="expiring"', 1)[1].split("</table>", 1)[0]
    assert f'href="/console/mandates/{soon.id}"' in expiring


async def test_mandate_search_by_id_client_lei_and_status(console: Console) -> None:
    svc = console.services
    client_id = await new_client(svc)
    first = await new_mandate(svc, client_id)
    second = await new_mandate(svc, client_id)
    await svc.mandates.suspend(second, actor="test", reason="search test")
    agent = console.agents["ada"]
    by_id = (await agent.get(f"/console/mandates?q={first}")).text
    assert first in by_id
    assert second not in by_id
    by_client = (await agent.get(f"/console/mandates?q={client_id}")).text
    assert first in by_client
    assert second in by_client
    suspended = (await agent.get(f"/console/mandates?q={client_id}&status=suspended")).text
    assert second in suspended
    assert first not in suspended
    by_lei = (await agent.get(f"/console/mandates?q={GRANTOR}")).text
    assert "mandates" in by_lei
    nothing = await agent.get("/console/mandates?q=mdt_doesnotexist000")
    assert nothing.status_code == 200
    assert 'id="none"' in nothing.text


async def test_mandate_versions_side_by_side_with_what_changed(console: Console) -> None:
    svc = console.services
    mandate_id = await new_mandate(svc)
    await svc.mandates.amend(
        mandate_id, actor="test", changes={"scopes": ["order:create", "order:cancel"]}
    )
    page = (await console.agents["ada"].get(f"/console/mandates/{mandate_id}")).text
    second = html.unescape(page.split('id="v2"', 1)[1].split("</section>", 1)[0])
    assert "Changed from version 1" in second
    assert '<th scope="row">scopes</th>' in second
    assert '["order:create"]' in second
    assert '["order:cancel","order:create"]' in second
    assert "effective_from" not in second  # only what changed
    history = page.split('id="history"', 1)[1]
    assert "created" in history
    assert "amended" in history
    # an auditor sees no action buttons; an operator does
    assert "/console/confirm?action=mandate:revoke" not in page
    operator = (await console.agents["olivia"].get(f"/console/mandates/{mandate_id}")).text
    assert f"/console/confirm?action=mandate:revoke&amp;target={mandate_id}" in operator


async def test_unknown_things_are_404_pages(console: Console) -> None:
    agent = console.agents["ada"]
    for path in ("/console/mandates/mdt_nope", "/console/clients/nope", "/console/partners/nope"):
        answer = await agent.get(path)
        assert answer.status_code == 404, path
        assert 'role="alert"' in answer.text


async def chain(svc: Services, txn: str) -> str:
    mandate_id = await new_mandate(svc)
    person = "u_person"
    await emit(
        svc,
        event(AuditEventType.CONSENT_GRANTED, subject=person, client_id="c1", mandate_id=mandate_id,
              mandate_version=1, transaction_id=txn, decision="allow"),
        event(AuditEventType.TOKEN_ISSUED, subject=person, client_id="c1", mandate_id=mandate_id,
              mandate_version=1, transaction_id=txn, jti="jti-first", decision="allow"),
        event(AuditEventType.TOKEN_ISSUED, subject=person, client_id="c2", transaction_id=txn,
              jti="jti-exchanged", actor_chain=("c1",), decision="allow"),
        event(AuditEventType.POLICY_DECISION_ALLOWED, subject=person, transaction_id=txn,
              decision="allow", reason="within_limits"),
        event(AuditEventType.TOKEN_REVOKED, subject=person, transaction_id=txn, jti="jti-first"),
    )  # fmt: skip
    return mandate_id


async def test_transaction_page_draws_the_chain_with_checked_proofs(console: Console) -> None:
    txn = "txn-" + secrets.token_hex(6)
    mandate_id = await chain(console.services, txn)
    page = (await console.agents["ada"].get(f"/console/transactions/{txn}")).text
    assert "Every entry below was checked against the latest signed checkpoint" in page
    stages = dict(
        re.findall(r"<h2>(\w+)</h2>(.*?)</li>\s*(?=<li class=\"stage\">|</ol>)", page, re.S)
    )
    assert list(stages) == [
        "Person", "Mandate", "Tokens", "Exchanges", "Decisions", "Transitions", "Events"
    ]  # fmt: skip
    assert "u_person" in stages["Person"]
    assert mandate_id in stages["Mandate"]
    assert "jti-first" in stages["Tokens"]
    assert "jti-exchanged" in stages["Exchanges"]
    assert "within_limits" in stages["Decisions"]
    assert "oauth:token:revoked" in stages["Events"]
    # 5 entries: the consent under its person, its mandate and the events; the first token under
    # its mandate and the tokens
    assert page.count('class="proof ok">included') == 8
    assert "not proved" not in page


async def test_export_with_proofs_verifies_offline(console: Console, tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = console.services
    txn = "txn-" + secrets.token_hex(6)
    await chain(svc, txn)
    agent = console.agents["ada"]
    page = (await agent.get(f"/console/audit?transaction_id={txn}")).text
    size = re.search(r"checkpoint\?size=(\d+)", page)
    assert size
    await emit(svc, event(AuditEventType.TOKEN_ISSUED, subject="later"))  # the log moves on
    export = await agent.get(f"/console/audit/export?transaction_id={txn}&size={size.group(1)}")
    assert export.status_code == 200
    assert export.headers["content-disposition"].startswith("attachment")
    note = await agent.get(f"/console/audit/checkpoint?size={size.group(1)}")
    path = tmp_path / "export.jsonl"
    path.write_bytes(export.content)
    records = list(read_export(path))
    assert len(records) == 5
    report = verify_export(records, note.text, await svc.ledger.verifier_key())
    assert report.ok, report.failures


async def test_audit_search_filters_and_pages(console: Console) -> None:
    svc = console.services
    txn = "txn-" + secrets.token_hex(6)
    await chain(svc, txn)
    agent = console.agents["ada"]
    page = (await agent.get(f"/console/audit?transaction_id={txn}&type=oauth:token:issued")).text
    rows = page.split('id="events"', 1)[1].split("</table>", 1)[0]
    assert rows.count("<tr>") == 3  # the header and two issues
    assert 'class="proof ok">included' in rows


async def test_policy_diff_and_simulation(console: Console) -> None:
    svc = console.services
    old = svc.policy.engine.version
    assert old is not None
    new = await new_bundle(svc, "diff-test")
    agent = console.agents["carl"]
    page = (await agent.get(f"/console/policy?old={old}&new={new}")).text
    assert '<span class="ins">+// diff-test</span>' in page
    posted = await agent.post(
        "/console/policy/simulate", data={"csrf": await console.csrf(agent), "version": new}
    )
    assert posted.status_code == 200
    assert 'id="simulation"' in posted.text
    assert re.search(r'id="flips">\d+ flipped', posted.text)


async def test_partner_versions_diff_and_last_conformance_run(console: Console) -> None:
    from tests.federation.partners import Partner

    svc = console.services
    partner = Partner("p-diff", "https://p-diff.example", svc.settings.issuer)
    await svc.federation.add(partner.profile(), changed_by="test")
    await svc.federation.update(
        "p-diff", partner.profile(max_assertion_lifetime=120), changed_by="test"
    )
    agent = console.agents["olivia"]
    page = (await agent.get("/console/partners/p-diff")).text
    assert "Never run from the console." in page
    v2 = page.split('id="pv2"', 1)[1].split("</section>", 1)[0]
    assert '<th scope="row">max_assertion_lifetime</th>' in v2
    posted = await agent.post(
        "/console/partners/p-diff/conformance",
        data={
            "csrf": await console.csrf(agent),
            "metadata_url": "https://p-diff.invalid/.well-known/oauth-authorization-server",
        },
    )
    assert posted.status_code == 303
    await svc.ledger.integrate_all()
    page = (await agent.get("/console/partners/p-diff")).text
    assert "Never run from the console." not in page
    assert "failed" in page.split("Last conformance run", 1)[1].split("<h2>", 1)[0]


async def test_partner_page_shows_the_token_binding_and_its_change(console: Console) -> None:
    from tests.federation.partners import Partner

    svc = console.services
    partner = Partner("p-binding", "https://p-binding.example", svc.settings.issuer)
    await svc.federation.add(partner.profile(token_binding=None), changed_by="test")
    await svc.federation.update(
        "p-binding", partner.profile(token_binding="bearer"), changed_by="test"
    )
    page = (await console.agents["olivia"].get("/console/partners/p-binding")).text
    assert '<dd class="code" id="token-binding">bearer</dd>' in page
    v2 = page.split('id="pv2"', 1)[1].split("</section>", 1)[0]
    row = v2.split('<th scope="row">token_binding</th>', 1)[1].split("</tr>", 1)[0]
    assert ">sender_constrained</td>" in row
    assert ">bearer</td>" in row


async def test_clients_list_and_registration_history(console: Console) -> None:
    svc = console.services
    client_id = await new_client(svc)
    await svc.ledger.integrate_all()
    agent = console.agents["ada"]
    assert client_id in (await agent.get("/console/clients")).text
    from trustplane.clients.model import ClientStatus

    await svc.clients.set_status(client_id, ClientStatus.DISABLED)
    await svc.ledger.integrate_all()
    page = html.unescape((await agent.get(f"/console/clients/{client_id}")).text)
    history = page.split('id="client-history"', 1)[1].split("</table>", 1)[0]
    assert "oauth:client:registered" in history
    assert "oauth:client:disabled" in history
    disabled = history.split("oauth:client:disabled", 1)[1].split("</tr>", 1)[0]
    assert "<strong>status</strong>" in disabled
    assert "active" in disabled
    assert "disabled" in disabled
    assert "<strong>scopes</strong>" not in disabled  # only what changed


async def test_alerts_fire_on_failed_sign_ins(console: Console) -> None:
    svc = console.services
    await emit(
        svc,
        *[event(AuditEventType.USER_LOGIN_FAILED, subject="u_x", reason="bad") for _ in range(10)],
    )
    page = (await console.agents["ada"].get("/console/alerts")).text
    table = page.split('id="alerts"', 1)[1].split("</table>", 1)[0]
    assert "Failed sign-ins" in table
    assert "type=users:login:failed" in table


async def test_partners_page_lists_partners(console: Console) -> None:
    await new_partner(console.services, "p-list")
    page = (await console.agents["ada"].get("/console/partners")).text
    assert "/console/partners/p-list" in page


async def test_keys_page(console: Console) -> None:
    svc = console.services
    page = (await console.agents["olivia"].get("/console/keys")).text
    assert page.count("<h1>") == 1
    for key in await svc.keys.list_all():
        assert key.kid in page
    assert "/console/confirm?action=keys:rotate" in page


def _certificate(key, days: int) -> str:  # type: ignore[no-untyped-def]
    import base64
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


async def test_overview_lists_client_certificates_that_end_soon(console: Console) -> None:
    from tests.conftest import jwks_for, new_ec_key, register_kit

    key, later = new_ec_key(), new_ec_key()
    jwks = jwks_for(key, "cert-soon")
    jwks["keys"][0]["x5c"] = [_certificate(key, 5)]
    other = jwks_for(later, "cert-later")["keys"][0]
    other["x5c"] = [_certificate(later, 200)]
    jwks["keys"].append(other)
    kit = await register_kit(console.services, jwks=jwks)
    page = (await console.agents["ada"].get("/console")).text
    expiring = page.split('id="expiring"', 1)[1].split("</table>", 1)[0]
    assert f"{kit.client_id} cert-soon" in expiring
    assert "cert-later" not in expiring


async def test_surveillance_alerts_from_the_ledger_on_alerts_and_overview(
    console: Console,
) -> None:
    """Each ``surveillance:alert:raised`` entry is shown as it is (docs/surveillance.md): the signal,
    whom it is about, the threshold crossed and the evidence; delegation alerts link to the
    transaction, window alerts to the client's or partner's alert entries."""
    await emit(
        console.services,
        event(
            AuditEventType.SURVEILLANCE_ALERT,
            client_id="c-spiky",
            reason="issuance.spike",
            reason_ids=("observed=101", "threshold=100", "window=300s", "sequence=3,104"),
            service="trustplane.surveillance",
        ),
        event(
            AuditEventType.SURVEILLANCE_ALERT,
            client_id="c-deleg",
            subject="alice",
            actor_chain=("svc-b",),
            transaction_id="T-surv-1",
            reason="unusual_delegation.new_actor_pair",
            reason_ids=("observed=1", "threshold=0", "sequence=42"),
            service="trustplane.surveillance",
        ),
    )
    agent = console.agents["ada"]
    page = (await agent.get("/console/alerts")).text
    table = html.unescape(page.split('id="alerts"', 1)[1].split("</table>", 1)[0])
    assert "Surveillance: issuance.spike" in table
    assert "client c-spiky: observed=101 threshold=100 window=300s sequence=3,104" in table
    assert "/console/audit?type=surveillance%3Aalert%3Araised&client_id=c-spiky" in table
    assert "Surveillance: unusual_delegation.new_actor_pair" in table
    assert "/console/transactions/T-surv-1" in table
    assert 'id="surveillance-rule"' in page
    overview = html.unescape((await agent.get("/console")).text)
    assert "Surveillance: issuance.spike" in overview.split('id="alerts-h"', 1)[1]
