"""The entity directory on SQLite and PostgreSQL: add, look up, search, and an import that is an
idempotent upsert written in batches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from trustplane.entities.model import EntityError, Source
from trustplane.entities.service import EntityDirectory
from trustplane.entities.store import SqlEntityStore
from trustplane.storage.db import Database

SAMPLE = Path(__file__).parent / "fixtures" / "golden_copy_sample.csv"
LEI = "5493001KJTIIGC8Y1R12"


@pytest.fixture
async def directory(db_url: str) -> AsyncIterator[EntityDirectory]:
    db = Database(db_url)
    yield EntityDirectory(db, SqlEntityStore())
    await db.dispose()


async def test_add_replaces_and_lookup_finds(directory: EntityDirectory) -> None:
    await directory.add(LEI, "Old Name S.A.", "LU")
    await directory.add(LEI.lower(), "Arranger Securities Europe S.A.", "LU", "ISSUED")
    found = await directory.lookup({LEI, "529900T8BM49AURSDO55", ""})
    assert list(found) == [LEI]
    assert found[LEI].legal_name == "Arranger Securities Europe S.A."
    assert found[LEI].source is Source.OPERATOR
    assert await directory.lookup(set()) == {}


async def test_add_refuses_a_bad_lei_and_writes_nothing(directory: EntityDirectory) -> None:
    with pytest.raises(EntityError, match="not a valid ISO 17442 LEI"):
        await directory.add("5493001KJTIIGC8Y1R13", "Wrong Check Digits S.A.")
    assert (await directory.list())[1] == 0


@pytest.mark.parametrize("batch_size", [1000, 2])
async def test_import_is_idempotent(directory: EntityDirectory, batch_size: int) -> None:
    first = await directory.import_golden_copy(SAMPLE, batch_size=batch_size)
    assert (first.rows, first.imported, first.skipped) == (8, 4, 4)
    assert dict(first.reasons) == {
        "invalid LEI": 1,
        "no legal name": 1,
        "invalid country": 1,
        "too few columns": 1,
    }
    before = {e.lei: e.legal_name for e in (await directory.list(limit=100))[0]}
    second = await directory.import_golden_copy(SAMPLE, batch_size=batch_size)
    assert (second.rows, second.imported, second.skipped) == (8, 4, 4)
    entities, total = await directory.list(limit=100)
    assert total == 4
    assert {e.lei: e.legal_name for e in entities} == before


async def test_import_overwrites_an_operator_entry(directory: EntityDirectory) -> None:
    await directory.add(LEI, "Typed By Hand", "LU")
    await directory.import_golden_copy(SAMPLE)
    entity = (await directory.lookup({LEI}))[LEI]
    assert (entity.legal_name, entity.source) == ("Arranger Securities Europe S.A.", Source.GLEIF)


async def test_a_repeated_lei_in_one_batch_keeps_the_last(
    directory: EntityDirectory, tmp_path: Path
) -> None:
    path = tmp_path / "twice.csv"
    path.write_text(
        f'"LEI","Entity.LegalName"\r\n"{LEI}","First Name"\r\n"{LEI}","Second Name"\r\n',
        encoding="utf-8",
    )
    report = await directory.import_golden_copy(path)
    assert report.imported == 2
    assert (await directory.lookup({LEI}))[LEI].legal_name == "Second Name"


async def test_search_by_name_or_lei(directory: EntityDirectory) -> None:
    await directory.import_golden_copy(SAMPLE)
    names = [e.legal_name for e in (await directory.list("générale"))[0]]
    assert (
        names == ['Société Générale "Test", Paris branch'] or names == []
    )  # SQLite lower() is ASCII
    assert [e.lei for e in (await directory.list("529900T8"))[0]] == ["529900T8BM49AURSDO55"]
    assert [e.legal_name for e in (await directory.list("GMBH"))[0]] == [
        "Meridian Asset Management GmbH"
    ]
    assert (await directory.list("100%_"))[0] == []  # LIKE wildcards are literal
    listed, total = await directory.list(limit=2)
    assert (len(listed), total) == (2, 4)
