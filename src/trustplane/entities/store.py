"""The ``legal_entities`` table and its store. Stores never commit: the caller's transaction does."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from sqlalchemy import BigInteger, Column, String, Table, Text, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.entities.model import LegalEntity, Source
from trustplane.storage.metadata import metadata

legal_entities = Table(
    "legal_entities",
    metadata,
    Column("lei", String(20), primary_key=True),
    Column("legal_name", Text, nullable=False),
    Column("country", String(2)),
    Column("registration_status", String(32)),
    Column("source", String(16), nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)


class EntityStore(Protocol):
    async def upsert(self, conn: AsyncConnection, entities: Sequence[LegalEntity]) -> None:
        """Insert each entity, or replace the row with its LEI: running it twice with the same
        entities leaves the same rows (idempotent import)."""
        ...

    async def get_many(
        self, conn: AsyncConnection, leis: Collection[str]
    ) -> dict[str, LegalEntity]:
        """The entities known for these LEIs (absent LEIs are simply not in the result)."""
        ...

    async def search(
        self, conn: AsyncConnection, text: str | None, limit: int
    ) -> list[LegalEntity]:
        """Up to ``limit`` entities whose LEI or legal name contains ``text`` (any case), by name."""
        ...

    async def count(self, conn: AsyncConnection) -> int: ...


def _entity(row: Any) -> LegalEntity:
    return LegalEntity(
        row.lei,
        row.legal_name,
        row.country,
        row.registration_status,
        Source(row.source),
        row.updated_at,
    )


class SqlEntityStore:
    async def upsert(self, conn: AsyncConnection, entities: Sequence[LegalEntity]) -> None:
        if not entities:
            return
        dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        statement = dialect_insert(legal_entities)
        columns = ("legal_name", "country", "registration_status", "source", "updated_at")
        statement = statement.on_conflict_do_update(
            index_elements=["lei"], set_={name: statement.excluded[name] for name in columns}
        )
        rows = [entity.public() for entity in _last_per_lei(entities)]
        await conn.execute(statement, rows)

    async def get_many(
        self, conn: AsyncConnection, leis: Collection[str]
    ) -> dict[str, LegalEntity]:
        if not leis:
            return {}
        rows = await conn.execute(select(legal_entities).where(legal_entities.c.lei.in_(leis)))
        return {row.lei: _entity(row) for row in rows}

    async def search(
        self, conn: AsyncConnection, text: str | None, limit: int
    ) -> list[LegalEntity]:
        query = select(legal_entities).order_by(legal_entities.c.legal_name).limit(limit)
        if text:
            pattern = (
                "%"
                + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                + "%"
            )
            query = query.where(
                func.lower(legal_entities.c.legal_name).like(pattern, escape="\\")
                | func.lower(legal_entities.c.lei).like(pattern, escape="\\")
            )
        return [_entity(row) for row in await conn.execute(query)]

    async def count(self, conn: AsyncConnection) -> int:
        return int(
            (await conn.execute(select(func.count()).select_from(legal_entities))).scalar_one()
        )


def _last_per_lei(entities: Sequence[LegalEntity]) -> list[LegalEntity]:
    """One row per LEI (the last wins): PostgreSQL refuses ON CONFLICT touching a row twice."""
    return list({entity.lei: entity for entity in entities}.values())
