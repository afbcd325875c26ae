"""``trustplane entities ...``: the entity directory the login and consent pages read legal names
from. A self-contained Typer app (the main CLI adds it with ``add_typer``): it needs the settings and
the database, nothing else.

``import`` reads a GLEIF golden-copy file offline (the LEI-CDF 3.1 "Concatenated file" as CSV, or
the ZIP it is published in); nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trustplane.cli import common
from trustplane.entities.model import EntityError
from trustplane.entities.service import EntityDirectory
from trustplane.entities.store import SqlEntityStore
from trustplane.settings import SettingsError

T = TypeVar("T")
entities_app: typer.Typer = typer.Typer(
    help="Entity directory: legal names shown beside LEIs on the login and consent pages.",
    no_args_is_help=True,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]trustplane:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


async def _with_directory(fn: Callable[[EntityDirectory], Awaitable[T]]) -> T:
    """The existing deployment's directory (``common.open_database`` creates nothing)."""
    settings = common._settings()
    db = await common.open_database(settings, create=False)
    try:
        await common.check_schema(settings, db)
        return await fn(EntityDirectory(db, SqlEntityStore()))
    finally:
        await db.dispose()


def _call(fn: Callable[[EntityDirectory], Awaitable[T]]) -> T:
    try:
        return asyncio.run(_with_directory(fn))
    except SettingsError as exc:
        raise _fail(str(exc), 2) from None
    except EntityError as exc:
        raise _fail(str(exc), 1) from None


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


@entities_app.command("add")
def entities_add(
    lei: str,
    name: Annotated[str, typer.Option(help="Legal name, as registered (shown beside the LEI).")],
    country: Annotated[
        str | None, typer.Option(help="Country of the legal address (ISO 3166-1 alpha-2).")
    ] = None,
    status: Annotated[
        str | None, typer.Option(help="GLEIF registration status (ISSUED, LAPSED, ...).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add a legal entity, or replace the one with this LEI."""
    entity = _call(lambda directory: directory.add(lei, name, country, status))
    if as_json:
        _emit_json(entity.public())
    else:
        out.print(f"{entity.lei}  {entity.legal_name}", highlight=False)


@entities_app.command("import")
def entities_import(
    path: Annotated[
        Path, typer.Argument(help="GLEIF golden copy: LEI-CDF 3.1 concatenated CSV, or its ZIP.")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Import a GLEIF golden-copy file (offline, streamed, idempotent); report skipped records."""
    report = _call(lambda directory: directory.import_golden_copy(path))
    skipped = [{"line": s.line, "lei": s.lei, "reason": s.reason} for s in report.examples]
    if as_json:
        _emit_json(
            {
                "rows": report.rows,
                "imported": report.imported,
                "skipped": report.skipped,
                "skipped_by_reason": dict(report.reasons),
                "skipped_records": skipped,
            }
        )
        return
    out.print(
        f"{report.rows} records read, {report.imported} imported, {report.skipped} skipped",
        highlight=False,
    )
    for reason, count in report.reasons.most_common():
        out.print(f"  {count} skipped: {reason}", highlight=False)
    for s in skipped:
        out.print(f"  line {s['line']}: {s['lei'] or '(no LEI)'}: {s['reason']}", highlight=False)
    if report.skipped > len(skipped):
        out.print(f"  ... and {report.skipped - len(skipped)} more", highlight=False)


@entities_app.command("list")
def entities_list(
    search: Annotated[
        str | None, typer.Option(help="Only entities whose LEI or legal name contains this.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List legal entities in the directory, by name."""
    entities, total = _call(lambda directory: directory.list(search, limit))
    if as_json:
        _emit_json({"total": total, "entities": [e.public() for e in entities]})
        return
    table = Table("lei", "legal name", "country", "status", "source")
    table.columns[0].no_wrap = True
    for e in entities:
        table.add_row(
            e.lei, e.legal_name, e.country or "", e.registration_status or "", e.source.value
        )
    out.print(table)
    out.print(f"{len(entities)} shown of {total} in the directory", highlight=False)
