"""The policy component's service: the bundle lifecycle (publish, activate, rollback) and the active
bundle held in memory by every process.

Each lifecycle change bumps the ``policy`` generation counter in its transaction; every process polls
the counters (``Services.refresh_caches``) and loads the new active bundle within the cache-refresh
interval; the process that made the change switches at once. Compiling happens on load, once per
bundle version: requests never parse policies or the schema.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.audit.sink import write_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.policy.bundle import (
    BundleError,
    BundleSource,
    CompiledBundle,
    compile_bundle,
    default_bundle,
)
from trustplane.policy.engine import PolicyEngine
from trustplane.policy.recorder import DecisionRecorder
from trustplane.policy.store import (
    Activation,
    ActivationConflict,
    BundleRecord,
    BundleStore,
    SqlBundleStore,
    UnknownBundle,
)
from trustplane.policy.tables import policy_decisions
from trustplane.policy.testing import CaseResult, run_cases
from trustplane.settings import Settings
from trustplane.storage import generations
from trustplane.storage.db import Database
from trustplane.storage.prune import delete_expired
from trustplane.storage.writer import GroupCommitWriter

log = structlog.get_logger("trustplane.policy")
GENERATION = "policy"
BUILTIN_CHANGE_REF = "builtin"


class PublishRefused(Exception):
    """The bundle does not validate or its tests fail; ``problems`` says why, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Published:
    record: BundleRecord
    created: bool
    tests: list[CaseResult]


def check_bundle(source: BundleSource) -> tuple[CompiledBundle, list[CaseResult]]:
    """Validate against the schema and run the bundle's tests; raise :class:`PublishRefused`."""
    try:
        compiled = compile_bundle(source)
    except BundleError as exc:
        raise PublishRefused([f"validation: {p}" for p in exc.problems]) from None
    try:
        results = run_cases(compiled)
    except BundleError as exc:
        raise PublishRefused([f"tests: {p}" for p in exc.problems]) from None
    failures = [f"test {r.file}: {r.name}: {r.problem}" for r in results if not r.passed]
    if not results:
        failures.append("tests: the bundle has no test cases (tests/*.yaml)")
    if failures:
        raise PublishRefused(failures)
    return compiled, results


class PolicyService:
    def __init__(
        self,
        db: Database,
        store: BundleStore,
        engine: PolicyEngine,
        *,
        issuer: str,
        retention_days: int = 90,
    ) -> None:
        self.db, self._store, self.engine = db, store, engine
        self._issuer = issuer
        self._retention_ms = retention_days * 86_400_000
        self._compiled: dict[str, CompiledBundle] = {}

    async def ensure_default(self) -> None:
        """First start: publish and activate the built-in bundle when no bundle is active."""
        async with self.db.read() as conn:
            if await self._store.active_version(conn) is not None:
                return
        published = await self.publish(default_bundle(), BUILTIN_CHANGE_REF, "trustplane")
        try:
            await self.activate(published.record.version, "trustplane", BUILTIN_CHANGE_REF)
        except ActivationConflict:  # another process activated something first: that one stands
            log.info("policy_default_activation_lost_race")

    async def load(self) -> None:
        """Load the active bundle into the engine (compiled once per version)."""
        async with self.db.read() as conn:
            version = await self._store.active_version(conn)
            if version is None or version == self.engine.version:
                return
            record = await self._store.get(conn, version)
        if record is None or record.source is None:
            return
        compiled = self._compiled.get(version)
        if compiled is None:
            compiled = compile_bundle(record.source)  # published bundles compiled before
            self._compiled = {version: compiled}
        self.engine.activate(compiled)
        log.info("policy_bundle_loaded", version=version, change_ref=record.change_ref)

    async def publish(self, source: BundleSource, change_ref: str, author: str) -> Published:
        if not change_ref.strip() or not author.strip():
            raise PublishRefused(["a change reference and an author are required"])
        compiled, results = check_bundle(source)
        async with self.db.transaction() as conn:
            record, created = await self._store.publish(conn, source, change_ref[:64], author[:128])
            if created:
                await write_events(
                    conn,
                    [
                        self._event(
                            AuditEventType.POLICY_BUNDLE_PUBLISHED,
                            record.version,
                            author,
                            change_ref,
                        )
                    ],
                )
        self._compiled.setdefault(compiled.version, compiled)
        return Published(record, created, results)

    async def activate(self, version: str, actor: str, change_ref: str | None) -> Activation:
        async with self.db.transaction() as conn:
            full = await self._store.resolve(conn, version)
            current = await self._store.active_version(conn)
            activation = await self._store.activate(
                conn, full, expected=current, actor=actor, change_ref=change_ref
            )
            await self._changed(conn, AuditEventType.POLICY_BUNDLE_ACTIVATED, activation)
        await self.load()
        return activation

    async def rollback(
        self, actor: str, change_ref: str | None, *, from_version: str | None = None
    ) -> Activation:
        """Re-activate the bundle that was active before the newest activation.

        ``from_version``: the bundle the operator means to roll back (a full version or a prefix);
        if another activation or rollback got there first, this one is refused instead of rolling
        back whatever is active now. Without it, two rollbacks in a row undo each other."""
        async with self.db.transaction() as conn:
            current = await self._store.active_version(conn)
            if from_version is not None and not (current or "").startswith(from_version):
                raise ActivationConflict(
                    f"the active bundle is {(current or 'none')[:12]}, not {from_version[:12]}"
                )
            history = await self._store.history(conn, limit=1)
            if not history or history[0].version != current or history[0].previous_version is None:
                raise UnknownBundle("there is no previous bundle to roll back to")
            activation = await self._store.activate(
                conn,
                history[0].previous_version,
                expected=current,
                actor=actor,
                change_ref=change_ref,
                action="rollback",
            )
            await self._changed(conn, AuditEventType.POLICY_BUNDLE_ROLLED_BACK, activation)
        await self.load()
        return activation

    async def prune(self, now_ms: int | None = None) -> int:
        """Delete recorded decision inputs older than the retention period (the audit events stay;
        only what simulation replays goes). Returns the number of rows removed."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        cutoff = now_ms - self._retention_ms
        async with self.db.transaction() as conn:
            return await delete_expired(conn, policy_decisions, policy_decisions.c.time_ms, cutoff)

    async def list(self) -> tuple[list[BundleRecord], list[Activation]]:
        async with self.db.read() as conn:
            return await self._store.all(conn), await self._store.history(conn)

    async def get(self, version: str) -> BundleRecord:
        async with self.db.read() as conn:
            record = await self._store.get(conn, await self._store.resolve(conn, version))
        if record is None:
            raise UnknownBundle(f"version {version!r} is not published")
        return record

    async def _changed(
        self, conn: AsyncConnection, type_: AuditEventType, activation: Activation
    ) -> None:
        await generations.bump(conn, GENERATION)
        event = self._event(type_, activation.version, activation.actor, activation.change_ref)
        await write_events(conn, [event])

    def _event(
        self, type_: AuditEventType, version: str, actor: str, change_ref: str | None
    ) -> AuditEvent:
        return AuditEvent(
            type=type_,
            issuer=self._issuer,
            subject=actor[:128],
            policy_bundle_version=version,
            service="trustplane.policy",
            payload={"change_ref": change_ref},
        )


def build_policy(settings: Settings, db: Database, writer: GroupCommitWriter) -> PolicyService:
    """The policy component as the app wires it: engine recording through the group-commit writer."""
    regions = tuple(settings.policy_served_regions)
    engine = PolicyEngine(
        issuer=settings.issuer, served_regions=regions, recorder=DecisionRecorder(writer)
    )
    return PolicyService(
        db,
        SqlBundleStore(),
        engine,
        issuer=settings.issuer,
        retention_days=settings.policy_decision_retention_days,
    )
