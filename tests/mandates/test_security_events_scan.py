"""The SET publisher's read (``published_at IS NULL ORDER BY seq LIMIT n``) goes through the partial
index of the SETs not yet published, with and without statistics, on SQLite and PostgreSQL: the
published ones (nearly all) are neither read nor indexed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, select

from trustplane.mandates.events import SecurityEvents
from trustplane.mandates.tables import security_events
from trustplane.storage.db import Database

ROWS, PENDING = 5000, 3
INDEX = "ix_security_events_unpublished"


class Recording:
    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish(self, event_type: str, jti: str, token: str) -> None:
        self.published.append(jti)


async def _publish(db: Database) -> tuple[list[str], str]:
    """What the publisher published, and the plan of its read."""
    seen: list[tuple[str, Any]] = []

    def record(_c: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    publisher = Recording()
    events = SecurityEvents(None, None, publisher)  # type: ignore[arg-type]
    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        await events.publish_pending(db)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)
    ((sql, params),) = seen
    explain = "EXPLAIN QUERY PLAN" if db.is_sqlite else "EXPLAIN"
    async with db.read() as conn:
        plan = (await conn.exec_driver_sql(f"{explain} {sql}", params)).all()
    return publisher.published, "\n".join(str(r[-1]) for r in plan)


async def test_the_publisher_reads_the_unpublished_sets_only(db_url: str) -> None:
    db = Database(db_url)
    try:
        async with db.transaction() as conn:
            await conn.execute(
                security_events.insert(),
                [
                    {"jti": f"j{i:05}", "event_type": "t", "mandate_id": f"m{i}",
                     "mandate_version": 1, "token": "x", "created_at": i,
                     "published_at": None if i >= ROWS - PENDING else i}
                    for i in range(ROWS)
                ],
            )  # fmt: skip
        for analyzed in (False, True):
            if analyzed:
                async with db.transaction() as conn:
                    await conn.exec_driver_sql("ANALYZE security_events")
            published, plan = await _publish(db)
            assert published == ([] if analyzed else [f"j{i:05}" for i in range(ROWS - 3, ROWS)])
            assert INDEX in plan, plan
            assert "Seq Scan" not in plan, plan
        async with db.read() as conn:
            left = (
                await conn.execute(
                    select(security_events.c.jti).where(security_events.c.published_at.is_(None))
                )
            ).all()
        assert left == []
    finally:
        await db.dispose()
