"""The entity directory, framework-free: the operator adds legal entities one by one or imports a
GLEIF golden copy; the login and consent pages look names up by LEI.

An import writes in batches (one transaction each), so a running server is never blocked for long
by a 3 GB file. It is an idempotent upsert: if it is interrupted, running it again completes it.
"""

from __future__ import annotations

import builtins
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from trustplane.entities.golden_copy import Skipped, read_golden_copy
from trustplane.entities.model import LegalEntity, Source, legal_entity
from trustplane.entities.store import EntityStore
from trustplane.storage.db import Database

#: How many skipped records an import report lists one by one (all are counted).
MAX_LISTED = 100


@dataclass
class ImportReport:
    rows: int = 0
    imported: int = 0
    skipped: int = 0
    #: Why records were skipped: reason -> count.
    reasons: Counter[str] = field(default_factory=Counter)
    #: The first :data:`MAX_LISTED` skipped records.
    examples: list[Skipped] = field(default_factory=list)

    def skip(self, record: Skipped) -> None:
        self.skipped += 1
        self.reasons[record.kind] += 1
        if len(self.examples) < MAX_LISTED:
            self.examples.append(record)


class EntityDirectory:
    def __init__(self, db: Database, store: EntityStore) -> None:
        self._db, self._store = db, store

    async def add(
        self, lei: str, legal_name: str, country: str | None = None, status: str | None = None
    ) -> LegalEntity:
        """Add an entity, or replace the one with that LEI."""
        entity = legal_entity(lei, legal_name, country, status, Source.OPERATOR, int(time.time()))
        async with self._db.transaction() as conn:
            await self._store.upsert(conn, [entity])
        return entity

    async def lookup(self, leis: Collection[str]) -> dict[str, LegalEntity]:
        async with self._db.read() as conn:
            return await self._store.get_many(conn, {lei.upper() for lei in leis if lei})

    async def list(
        self, search: str | None = None, limit: int = 50
    ) -> tuple[builtins.list[LegalEntity], int]:
        """Entities matching ``search`` (LEI or name), by name, and how many the directory holds."""
        async with self._db.read() as conn:
            return await self._store.search(conn, search, limit), await self._store.count(conn)

    async def import_golden_copy(self, path: Path, batch_size: int = 1000) -> ImportReport:
        """Upsert every valid record of a golden-copy file; :class:`EntityError` if the file
        itself is unreadable (the batches written before stay written: run the import again)."""
        report, batch = ImportReport(), builtins.list[LegalEntity]()
        for record in read_golden_copy(path, int(time.time())):
            report.rows += 1
            if isinstance(record, Skipped):
                report.skip(record)
                continue
            batch.append(record)
            if len(batch) >= batch_size:
                report.imported += await self._write(batch)
        report.imported += await self._write(batch)
        return report

    async def _write(self, batch: builtins.list[LegalEntity]) -> int:
        count = len(batch)
        async with self._db.transaction() as conn:
            await self._store.upsert(conn, batch)
        batch.clear()
        return count
