"""``trustplane mandates ...``: create, accept, amend, suspend, resume, revoke, list, show, history.

Changes are made directly on the database (you hold it, as with ``trustplane clients add``); running
servers see them within ``TRUSTPLANE_CACHE_REFRESH_INTERVAL``. The actor recorded in the history and
the audit trail is ``cli:<OS user>``.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import structlog
import typer
from rich.table import Table

from trustplane.cli.common import JsonFlag, _emit_json, _run, _settings, _with_services, err, out
from trustplane.errors import OAuth2Error
from trustplane.logging import configure_logging
from trustplane.mandates.errors import MandateError
from trustplane.mandates.model import (
    LegalBasis,
    Mandate,
    MandateFilter,
    MandateStatus,
    MandateTerms,
)
from trustplane.mandates.service import MandateService, cli_actor

if TYPE_CHECKING:
    from trustplane.services import Services

T = TypeVar("T")
mandates_app: typer.Typer = typer.Typer(
    help="Mandates: durable, versioned delegations.", no_args_is_help=True
)
Reason = Annotated[str | None, typer.Option(help="Why (kept in the history and audit trail).")]
WhenOpt = Annotated[
    str | None, typer.Option(help="UTC date or time: 2027-03-31, 2027-03-31T17:00:00Z or epoch.")
]


def _time(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        err.print(f"[red]trustplane:[/red] --{name}: not a date or time: {value!r}")
        raise typer.Exit(2) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


def _details(text: str | None, file: Path | None) -> tuple[dict[str, Any], ...] | None:
    if text is None and file is None:
        return None
    try:
        value = json.loads(file.read_text() if file is not None else str(text))
    except (OSError, json.JSONDecodeError) as exc:
        err.print(f"[red]trustplane:[/red] authorization details: {exc}")
        raise typer.Exit(2) from None
    return tuple(value) if isinstance(value, list) else (value,)


def _call(fn: Callable[[MandateService], Awaitable[T]]) -> T:
    async def run(svc: Services) -> T:
        await svc.keys.load()  # security events are signed with the active key
        await svc.clients.load()  # grantee clients are checked against the registry
        try:
            return await fn(svc.mandates)
        finally:
            await svc.mandates.events.aclose()

    settings = _settings()
    # log lines go to stderr so that --json output on stdout stays parseable
    configure_logging(settings.log_level, "console")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        return _run(_with_services(settings, run))
    except (MandateError, OAuth2Error) as exc:
        message = f"{exc.error}: {exc.description}" if isinstance(exc, OAuth2Error) else str(exc)
        err.print(f"[red]trustplane:[/red] {message}", highlight=False)
        raise typer.Exit(1) from None


def _when(ts: int | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%MZ") if ts else "-"


def _print(mandate: Mandate, as_json: bool) -> None:
    if as_json:
        _emit_json(mandate.to_dict())
        return
    rows = [
        ("mandate", f"{mandate.id} v{mandate.version} (current v{mandate.current_version})"),
        (
            "status",
            mandate.status.value + (f" ({mandate.status_reason})" if mandate.status_reason else ""),
        ),
        ("grantor", f"{mandate.grantor_lei} {mandate.grantor_person or ''}".strip()),
        ("grantee", f"{mandate.grantee_client_id} ({mandate.grantee_lei})"),
        ("scopes", " ".join(mandate.scopes)),
        ("effective", f"{_when(mandate.effective_from)} -> {_when(mandate.effective_until)}"),
        ("legal basis", f"{mandate.legal_basis.value} {mandate.document_ref or ''}".strip()),
        ("accepted", f"{mandate.accepted_by or '-'} {_when(mandate.accepted_at)}"),
        ("revocation", mandate.revocation_path),
    ]
    for label, value in rows:
        out.print(f"{label:<12} {value}", highlight=False)
    for detail in mandate.authorization_details:
        out.print("details")
        for label, value in _describe(detail):
            out.print(f"  {label:<28} {value}", highlight=False)


def _describe(detail: dict[str, Any]) -> list[tuple[str, str]]:
    from trustplane.rar.registry import AuthorizationDetailsRegistry

    return AuthorizationDetailsRegistry.load(_settings().authorization_details_types_dir).describe(
        detail
    )


@mandates_app.command("create")
def create(
    grantor_lei: Annotated[str, typer.Option(help="LEI of the granting legal entity.")],
    grantee: Annotated[str, typer.Option(help="client_id of the grantee.")],
    scope: Annotated[list[str], typer.Option(help="Granted scope (repeatable).")],
    until: WhenOpt = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="Effective from (default: now).")
    ] = None,
    details: Annotated[str | None, typer.Option(help="authorization_details JSON.")] = None,
    details_file: Annotated[
        Path | None, typer.Option(help="File with authorization_details JSON.")
    ] = None,
    legal_basis: Annotated[LegalBasis, typer.Option(help="Legal basis.")] = LegalBasis.MANDATE,
    document_ref: Annotated[
        str | None, typer.Option(help="Reference of the signed document.")
    ] = None,
    grantor_person: Annotated[str | None, typer.Option(help="The natural person granting.")] = None,
    accepted_by: Annotated[
        str | None, typer.Option(help="Who accepted (active at once); omit to propose.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a mandate (version 1): proposed, or active when --accepted-by is given."""
    terms = MandateTerms(
        grantor_lei=grantor_lei,
        grantee_client_id=grantee,
        scopes=tuple(scope),
        authorization_details=_details(details, details_file) or (),
        effective_from=_time(from_, "from"),
        effective_until=_time(until, "until"),
        legal_basis=legal_basis,
        document_ref=document_ref,
        grantor_person=grantor_person,
    )
    mandate = _call(lambda m: m.create(terms, actor=cli_actor(), accepted_by=accepted_by))
    _print(mandate, as_json)


@mandates_app.command("accept")
def accept(
    mandate_id: str,
    by: Annotated[str, typer.Option("--by", help="Who accepted (the grantor's person).")],
    as_json: JsonFlag = False,
) -> None:
    """Accept a proposed mandate: it becomes active."""
    _print(_call(lambda m: m.accept(mandate_id, accepted_by=by, actor=cli_actor())), as_json)


@mandates_app.command("amend")
def amend(
    mandate_id: str,
    scope: Annotated[list[str] | None, typer.Option(help="New scope set (repeatable).")] = None,
    until: WhenOpt = None,
    from_: Annotated[str | None, typer.Option("--from", help="New effective-from.")] = None,
    details: Annotated[str | None, typer.Option(help="New authorization_details JSON.")] = None,
    details_file: Annotated[Path | None, typer.Option(help="File with the new details.")] = None,
    legal_basis: Annotated[LegalBasis | None, typer.Option(help="New legal basis.")] = None,
    document_ref: Annotated[str | None, typer.Option(help="New document reference.")] = None,
    expected_version: Annotated[
        int | None, typer.Option(help="Refuse if the mandate is no longer at this version.")
    ] = None,
    accepted_by: Annotated[str | None, typer.Option(help="Who agreed to the amendment.")] = None,
    reason: Reason = None,
    as_json: JsonFlag = False,
) -> None:
    """Amend: a new version; the previous one is superseded (its tokens stop being usable)."""
    changes: dict[str, Any] = {
        "scopes": tuple(scope) if scope else None,
        "authorization_details": _details(details, details_file),
        "effective_from": _time(from_, "from"),
        "effective_until": _time(until, "until"),
        "legal_basis": legal_basis,
        "document_ref": document_ref,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        err.print("[red]trustplane:[/red] nothing to amend")
        raise typer.Exit(2)
    mandate = _call(
        lambda m: m.amend(
            mandate_id, actor=cli_actor(), changes=changes, expected_version=expected_version,
            accepted_by=accepted_by, reason=reason,
        )
    )  # fmt: skip
    _print(mandate, as_json)


def _transition(action: str, mandate_id: str, reason: str | None, as_json: bool) -> None:
    mandate = _call(lambda m: getattr(m, action)(mandate_id, actor=cli_actor(), reason=reason))
    _print(mandate, as_json)


@mandates_app.command("suspend")
def suspend(mandate_id: str, reason: Reason = None, as_json: JsonFlag = False) -> None:
    """Suspend: its tokens go inactive and refresh is refused until resumed."""
    _transition("suspend", mandate_id, reason, as_json)


@mandates_app.command("resume")
def resume(mandate_id: str, reason: Reason = None, as_json: JsonFlag = False) -> None:
    """Resume a suspended mandate."""
    _transition("resume", mandate_id, reason, as_json)


@mandates_app.command("revoke")
def revoke(mandate_id: str, reason: Reason = None, as_json: JsonFlag = False) -> None:
    """Revoke (final): its tokens go inactive and refresh is refused at once."""
    _transition("revoke", mandate_id, reason, as_json)


@mandates_app.command("list")
def list_(
    grantor: Annotated[str | None, typer.Option(help="Grantor LEI.")] = None,
    grantee: Annotated[str | None, typer.Option(help="Grantee client_id.")] = None,
    status: Annotated[MandateStatus | None, typer.Option(help="Status (as of now).")] = None,
    expiring_within: Annotated[
        int | None, typer.Option(help="Only those ending within N days.", min=0, max=3660)
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 200,
    as_json: JsonFlag = False,
) -> None:
    """List mandates (current versions), newest first."""
    within = expiring_within * 86400 if expiring_within is not None else None
    flt = MandateFilter(grantor, grantee, status, within, limit)
    found = _call(lambda m: m.list(flt))
    if as_json:
        _emit_json([m.to_dict() for m in found])
        return
    table = Table("id", "v", "status", "grantor", "grantee", "scopes", "until", "basis")
    for m in found:
        table.add_row(
            m.id, str(m.version), m.status.value, m.grantor_lei, m.grantee_client_id,
            " ".join(m.scopes), _when(m.effective_until), m.legal_basis.value,
        )  # fmt: skip
    out.print(table)


@mandates_app.command("show")
def show(
    mandate_id: str,
    version: Annotated[int | None, typer.Option(help="A specific version.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show a mandate (current version unless --version)."""
    _print(_call(lambda m: m.get(mandate_id, version)), as_json)


@mandates_app.command("history")
def history(mandate_id: str, as_json: JsonFlag = False) -> None:
    """Every version and every change of a mandate."""
    found = _call(lambda m: m.history(mandate_id))
    if as_json:
        _emit_json(
            {
                "versions": [v.to_dict() for v in found.versions],
                "changes": [c.to_dict() for c in found.changes],
            }
        )
        return
    versions = Table("v", "status", "scopes", "effective", "accepted by", "created by")
    for v in found.versions:
        versions.add_row(
            str(v.version), v.status.value, " ".join(v.scopes),
            f"{_when(v.effective_from)} -> {_when(v.effective_until)}",
            v.accepted_by or "-", v.created_by,
        )  # fmt: skip
    changes = Table("when", "v", "action", "status", "actor", "reason")
    for c in found.changes:
        changes.add_row(
            _when(c.at), str(c.version), c.action.value, c.status.value, c.actor, c.reason or ""
        )
    out.print(versions)
    out.print(changes)
