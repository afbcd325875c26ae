"""Everything the console changes, each through the owning service, each recorded in the ledger as a
``console:action:*`` event naming the person (``subject``: their user id; their display name and the
reason in the payload, which retention may purge while the leaf stays).

Who may do what (:data:`REQUIRED`): operators act on mandates, clients, partners and keys; compliance
on policy. The auditor role appears nowhere here, so an auditor can change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trustplane.audit.sink import write_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.clients.model import ClientStatus
from trustplane.clients.service import ClientService
from trustplane.console.roles import Role
from trustplane.federation.service import FederationService
from trustplane.keys.service import KeyService
from trustplane.mandates.service import MandateService
from trustplane.policy.service import PolicyService
from trustplane.storage.db import Database

MAX_REASON = 500

#: action -> the role it needs
REQUIRED: dict[str, Role] = {
    "mandate:suspend": Role.OPERATOR,
    "mandate:resume": Role.OPERATOR,
    "mandate:revoke": Role.OPERATOR,
    "client:disable": Role.OPERATOR,
    "client:enable": Role.OPERATOR,
    "partner:disable": Role.OPERATOR,
    "partner:conformance": Role.OPERATOR,
    "keys:rotate": Role.OPERATOR,
    "policy:activate": Role.COMPLIANCE,
    "policy:rollback": Role.COMPLIANCE,
    "policy:simulate": Role.COMPLIANCE,
}
#: actions that need a reason typed by the person
NEEDS_REASON = frozenset({"mandate:suspend", "mandate:revoke", "client:disable", "partner:disable"})


@dataclass(frozen=True, slots=True)
class Person:
    user_id: str
    display_name: str
    roles: frozenset[Role]


class ActionRefused(Exception):
    """The action was refused by the owning service; the message is shown."""


class Actions:
    def __init__(
        self,
        issuer: str,
        db: Database,
        mandates: MandateService,
        clients: ClientService,
        federation: FederationService,
        keys: KeyService,
        policy: PolicyService,
    ) -> None:
        self._issuer, self._db = issuer, db
        self._mandates, self._clients, self._federation = mandates, clients, federation
        self._keys, self._policy = keys, policy

    async def record(
        self,
        who: Person,
        type_: AuditEventType,
        action: str,
        target: str | None,
        *,
        refused: str | None = None,
        **payload: Any,
    ) -> None:
        event = AuditEvent(
            type=type_,
            issuer=self._issuer,
            subject=who.user_id,
            client_id=target if action.startswith("client:") else None,
            partner=target if action.startswith("partner:") else None,
            mandate_id=target if action.startswith("mandate:") else None,
            decision="deny" if refused else "allow",
            reason=refused,
            service="trustplane.console",
            payload={
                "action": action,
                "target": target,
                "person": who.display_name,
                "roles": sorted(r.value for r in who.roles),
                **payload,
            },
        )
        async with self._db.transaction() as conn:
            await write_events(conn, [event])

    async def perform(self, who: Person, action: str, target: str, reason: str) -> str:
        """Do ``action`` on ``target``; return what to tell the person. The caller checked the
        role; refusals by the service raise :class:`ActionRefused` (and are recorded)."""
        reason = reason.strip()[:MAX_REASON]
        if action in NEEDS_REASON and not reason:
            raise ActionRefused("Give a reason: it is recorded with the action.")
        try:
            message = await self._do(who, action, target, reason)
        except ActionRefused as exc:
            await self.record(
                who, AuditEventType.CONSOLE_ACTION_REFUSED, action, target,
                refused="refused", detail=str(exc)[:500], why=reason,
            )  # fmt: skip
            raise
        await self.record(who, AuditEventType.CONSOLE_ACTION, action, target, why=reason)
        return message

    async def _do(self, who: Person, action: str, target: str, reason: str) -> str:
        from trustplane.mandates.errors import MandateError
        from trustplane.policy.store import ActivationConflict, UnknownBundle

        try:
            return await self._dispatch(who, action, target, reason)
        except (MandateError, ActivationConflict, UnknownBundle, LookupError, ValueError) as exc:
            raise ActionRefused(str(exc) or type(exc).__name__) from None

    async def _dispatch(self, who: Person, action: str, target: str, reason: str) -> str:
        actor = who.user_id
        why = reason or None
        if action == "mandate:suspend":
            await self._mandates.suspend(target, actor=actor, reason=why)
            return f"Mandate {target} suspended."
        if action == "mandate:resume":
            await self._mandates.resume(target, actor=actor, reason=why)
            return f"Mandate {target} resumed."
        if action == "mandate:revoke":
            await self._mandates.revoke(target, actor=actor, reason=why)
            return f"Mandate {target} revoked."
        if action in ("client:disable", "client:enable"):
            status = ClientStatus.DISABLED if action == "client:disable" else ClientStatus.ACTIVE
            await self._clients.set_status(target, status)
            return f"Client {target} {status.value}."
        if action == "partner:disable":
            await self._federation.disable(target, changed_by=actor, reason=reason)
            return f"Partner {target} disabled."
        if action == "keys:rotate":
            kid = await self._keys.rotate(reason=f"console: {reason}" if reason else "console")
            return f"Signing key rotated; {kid} is active."
        if action == "policy:activate":
            done = await self._policy.activate(target, actor, reason or None)
            return f"Policy bundle {done.version[:12]} is active."
        if action == "policy:rollback":
            done = await self._policy.rollback(actor, reason or None, from_version=target or None)
            return f"Rolled back: policy bundle {done.version[:12]} is active."
        raise ActionRefused(f"Unknown action {action!r}.")

    async def conformance(
        self, who: Person, partner_id: str, metadata_url: str, *, loopback: bool
    ) -> list[dict[str, Any]]:
        """Run the conformance checker against the partner's metadata (outbound through the
        guarded fetcher) and record the checks in the ledger: that record is the "last run"."""
        from trustplane.federation.conformance import MAX_DOCUMENT, ConformanceChecker
        from trustplane.outbound import OutboundFetcher, OutboundPolicy

        try:
            stored = await self._federation.get(partner_id)
            profile = self._federation.validate(stored.document)
        except (LookupError, ValueError) as exc:
            raise ActionRefused(str(exc)) from None
        fetcher = OutboundFetcher(OutboundPolicy(allow_loopback=loopback, max_bytes=MAX_DOCUMENT))
        try:
            checker = ConformanceChecker(
                profile, audience=self._issuer, fetcher=fetcher, allow_insecure_loopback=loopback
            )
            checks = [c.as_dict() for c in await checker.run(metadata_url[:2000])]
        finally:
            await fetcher.aclose()
        ok = all(c.get("ok") for c in checks)
        await self.record(
            who, AuditEventType.CONSOLE_ACTION, "partner:conformance", partner_id,
            metadata_url=metadata_url[:2000], ok=ok, checks=checks,
        )  # fmt: skip
        return checks

    async def simulate(self, who: Person, version: str) -> Any:
        """Replay recorded decisions against a published bundle (policy/simulate.py); recorded."""
        from trustplane.policy.bundle import BundleError, compile_bundle
        from trustplane.policy.simulate import simulate
        from trustplane.policy.store import UnknownBundle

        try:
            record = await self._policy.get(version)
            if record.source is None:
                raise ActionRefused("That bundle has no files stored.")
            candidate = compile_bundle(record.source)
        except (UnknownBundle, BundleError) as exc:
            raise ActionRefused(str(exc)) from None
        report = await simulate(self._policy.db, candidate, examples=10)
        await self.record(
            who, AuditEventType.CONSOLE_ACTION, "policy:simulate", record.version,
            replayed=report.replayed, flips=report.flips,
        )  # fmt: skip
        return report
