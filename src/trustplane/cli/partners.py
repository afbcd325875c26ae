"""``trustplane partners ...``: validate, add, update, list, show and disable trust profiles, and run
the conformance checker against a partner's metadata (exit code 1 on any failed check, for CI)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from trustplane.cli import common
from trustplane.federation.profile import ProfileError, TrustProfile, parse_document

if TYPE_CHECKING:
    from trustplane.federation.store import StoredProfile
    from trustplane.services import Services

T = TypeVar("T")

partners_app = typer.Typer(help="Federated partners: trust profiles.", no_args_is_help=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
FileArg = Annotated[Path, typer.Argument(help="Trust profile document (YAML or JSON).")]
CHANGED_BY = "cli"


def _read(path: Path) -> Any:
    try:
        return parse_document(path.read_bytes())
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
    except ProfileError as exc:
        _refused(exc)


def _fail(message: str, code: int = 1) -> NoReturn:
    common.err.print(f"[red]trustplane:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _refused(exc: ProfileError, as_json: bool = False) -> NoReturn:
    if as_json:
        common._emit_json({"valid": False, "errors": exc.errors})
        raise typer.Exit(1)
    for problem in exc.errors:
        common.err.print(f"[red]invalid:[/red] {escape(problem)}", highlight=False)
    raise typer.Exit(1)


def _profile(path: Path, as_json: bool = False, **overrides: Any) -> TrustProfile:
    from trustplane.federation.profile import validate_profile

    settings = common._settings(**overrides)
    raw = _read(path)
    vocabulary = common.vocabulary(settings)
    try:
        return validate_profile(raw, settings, vocabulary)
    except ProfileError as exc:
        _refused(exc, as_json)


def _stored(stored: StoredProfile) -> dict[str, Any]:
    from trustplane.federation.http import stored_body

    return stored_body(stored)


def _service_call(fn: Callable[[Services], Awaitable[T]]) -> T:
    from trustplane.federation.service import (
        PartnerExistsError,
        PartnerNotFoundError,
        VersionConflictError,
    )

    try:
        return common._run(common._with_services(common._settings(), fn))
    except ProfileError as exc:
        _refused(exc)
    except PartnerNotFoundError as exc:
        _fail(f"no partner {str(exc)!r}")
    except (PartnerExistsError, VersionConflictError) as exc:
        _fail(str(exc))


def _print_version(stored: dict[str, Any], verb: str) -> None:
    common.out.print(
        f"partner {stored['partner_id']} {verb}: version {stored['version']}, {stored['status']}; "
        "running servers pick it up within the cache refresh interval"
    )


@partners_app.command("validate")
def validate(path: FileArg, as_json: JsonFlag = False) -> None:
    """Validate a trust profile against the schema and this deployment's settings and scopes."""
    profile = _profile(path, as_json)
    if as_json:
        common._emit_json({"valid": True, "partner_id": profile.partner_id})
    else:
        common.out.print(f"{path}: valid trust profile for partner {profile.partner_id}")


@partners_app.command("add")
def add(path: FileArg, as_json: JsonFlag = False) -> None:
    """Add a new partner (version 1). Audited as federation:partner:added."""
    raw = _read(path)
    stored = _stored(_service_call(lambda svc: svc.federation.add(raw, changed_by=CHANGED_BY)))
    common._emit_json(stored) if as_json else _print_version(stored, "added")


@partners_app.command("update")
def update(path: FileArg, as_json: JsonFlag = False) -> None:
    """Store a new version of an existing partner's profile (the document names the partner)."""
    raw = _read(path)
    partner_id = str(raw.get("partner_id", "")) if isinstance(raw, dict) else ""

    async def call(svc: Services) -> StoredProfile:
        return await svc.federation.update(partner_id, raw, changed_by=CHANGED_BY)

    stored = _stored(_service_call(call))
    common._emit_json(stored) if as_json else _print_version(stored, "updated")


@partners_app.command("list")
def list_partners(as_json: JsonFlag = False) -> None:
    """List partners (current version of each)."""
    rows = [_stored(s) for s in _service_call(lambda svc: svc.federation.current())]
    if as_json:
        common._emit_json(rows)
        return
    table = Table("partner", "version", "status", "lei", "issuers", "scopes")
    for r in rows:
        doc = r["profile"]
        table.add_row(
            r["partner_id"],
            str(r["version"]),
            r["status"],
            doc["lei"],
            "\n".join(doc["issuers"]),
            " ".join(doc["allowed_scopes"]),
        )
    common.out.print(table)


@partners_app.command("show")
def show(
    partner_id: str,
    versions: Annotated[bool, typer.Option("--versions", help="Every version.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show a partner's current profile (or its whole history with --versions)."""
    if versions:
        body: Any = [
            _stored(s) for s in _service_call(lambda svc: svc.federation.history(partner_id))
        ]
    else:
        body = _stored(_service_call(lambda svc: svc.federation.get(partner_id)))
    if as_json:
        common._emit_json(body)
        return
    import yaml

    for entry in body if versions else [body]:
        common.out.print(
            f"[bold]{entry['partner_id']}[/bold] version {entry['version']} ({entry['status']}), "
            f"by {escape(entry['changed_by'])} at {common._when(entry['created_at'])}"
        )
        common.out.print(escape(yaml.safe_dump(entry["profile"], sort_keys=False)), highlight=False)


@partners_app.command("disable")
def disable(
    partner_id: str,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit event).")] = "",
) -> None:
    """Disable a partner: a new version with status disabled; its assertions are refused at once."""

    async def call(svc: Services) -> StoredProfile:
        return await svc.federation.disable(partner_id, changed_by=CHANGED_BY, reason=reason)

    _print_version(_stored(_service_call(call)), "disabled")


@partners_app.command("conformance")
def conformance(
    profile_path: Annotated[Path, typer.Argument(metavar="PROFILE", help="Trust profile file.")],
    metadata_url: Annotated[
        str, typer.Option(help="The partner's RFC 8414 / OpenID metadata URL.")
    ],
    sample_token: Annotated[
        Path | None, typer.Option(help="File with a sample assertion the partner minted for us.")
    ] = None,
    audience: Annotated[
        str | None, typer.Option(help="Expected aud of the sample (default: our issuer).")
    ] = None,
    allow_insecure_loopback: Annotated[
        bool,
        typer.Option(help="Allow plain http to loopback hosts (tests and local sandboxes only)."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Check a partner's metadata, JWKS and a sample token against its profile. Exit 1 on any failure."""
    overrides = {"federation_allow_insecure_loopback": True} if allow_insecure_loopback else {}
    profile = _profile(profile_path, as_json, **overrides)
    settings = common._settings(**overrides)
    token = sample_token.read_text() if sample_token else None
    checks = asyncio.run(
        _conformance(
            profile, metadata_url, token, audience or settings.issuer, allow_insecure_loopback
        )
    )
    failed = [c for c in checks if not c.ok]
    if as_json:
        common._emit_json(
            {
                "partner_id": profile.partner_id,
                "ok": not failed,
                "checks": [c.as_dict() for c in checks],
            }
        )
    else:
        table = Table("", "check", "why", title=f"conformance of partner {profile.partner_id}")
        for c in checks:
            mark = "[green]pass[/green]" if c.ok else "[red]FAIL[/red]"
            table.add_row(mark, escape(c.name), escape(c.detail))
        common.out.print(table)
        common.out.print(
            f"{len(checks) - len(failed)} passed, {len(failed)} failed",
            style="red" if failed else "green",
        )
    if failed:
        raise typer.Exit(1)


async def _conformance(
    profile: TrustProfile, url: str, token: str | None, audience: str, insecure: bool
) -> list[Any]:
    import structlog

    from trustplane.federation.conformance import MAX_DOCUMENT, ConformanceChecker
    from trustplane.outbound import OutboundFetcher, OutboundPolicy

    # the fetcher's refusal lines go to stderr: stdout carries the report (and --json)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    policy = OutboundPolicy(allow_loopback=insecure, max_bytes=MAX_DOCUMENT)
    fetcher = OutboundFetcher(policy)
    try:
        checker = ConformanceChecker(
            profile, audience=audience, fetcher=fetcher, allow_insecure_loopback=insecure
        )
        return await checker.run(url, token)
    finally:
        await fetcher.aclose()
