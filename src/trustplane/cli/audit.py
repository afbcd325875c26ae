"""``trustplane audit``: the ledger from the command line.

``verify`` and ``monitor`` are the auditor's tools: they need the log's public key and trust nothing
else from the server. The others work on the deployment's database with the server's settings.
Exit codes: 0 proved, 1 verification failed, 2 usage or settings error.
"""

from __future__ import annotations

import csv
import json
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO, TypeVar
from urllib.parse import urlsplit

import orjson
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from trustplane.cli import common as base
from trustplane.cli.common import JsonFlag, err, out

# each command imports the parts of the ledger it uses: `audit verify` (offline) needs neither the
# database nor the services
if TYPE_CHECKING:
    from trustplane.audit.ledger import Ledger, SignedCheckpoint
    from trustplane.audit.report import Report
    from trustplane.audit.siem import Destination
    from trustplane.audit.store import StoredEntry
    from trustplane.services import Services

T = TypeVar("T")
#: Fetches a consistency proof between two tree sizes (from the server or the local database).
ConsistencyFetch = Callable[[int, int], list[bytes]]

audit_app = typer.Typer(help="The tamper-evident audit ledger.", no_args_is_help=True)
CSV_COLUMNS = (
    "index",
    "leaf_hash",
    "type",
    "time",
    "event_id",
    "subject",
    "client_id",
    "partner",
    "transaction_id",
    "entry",
    "payload",
    "salt",
    "inclusion_proof",
)


def _with_ledger(fn: Callable[[Services], Awaitable[T]]) -> T:
    """Run ``fn(services)`` against the configured database (settings errors exit 2)."""
    settings = base._settings()
    return base._run(base._with_services(settings, fn))


def _key_text(value: str) -> str:
    """A verifier key given inline or as a file holding it."""
    path = Path(value)
    if "+" not in value or (len(value) < 4096 and path.is_file()):
        try:
            return path.read_text().strip()
        except OSError:
            err.print(f"[red]trustplane:[/red] cannot read public key file {value}")
            raise typer.Exit(2) from None
    return value.strip()


def _print_report(report: Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.proved:
            out.print(f"[green]proved[/green]      {line}", highlight=False)
        for line in report.not_proved:
            out.print(f"[yellow]not proved[/yellow]  {line}", highlight=False)
        for line in report.failures:
            out.print(f"[red]FAILED[/red]      {line}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("checkpoint")
def checkpoint(as_json: JsonFlag = False) -> None:
    """Print the latest signed checkpoint (C2SP signed-note)."""
    latest = _with_ledger(lambda svc: svc.ledger.checkpoint())
    if latest is None:
        err.print("[red]trustplane:[/red] the log has no checkpoint yet (start the server once)")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps({"tree_size": latest.size, "note": latest.note}, indent=2))
    else:
        sys.stdout.write(latest.note)


@audit_app.command("public-key")
def public_key() -> None:
    """Print the log's signed-note verifier key (give it to auditors and monitors)."""
    print(_with_ledger(lambda svc: svc.ledger.verifier_key()))


@audit_app.command("integrate")
def integrate(as_json: JsonFlag = False) -> None:
    """Integrate every pending entry now and sign a checkpoint (servers do this continuously)."""

    async def run(svc: Services) -> tuple[int, SignedCheckpoint | None]:
        count = await svc.ledger.integrate_all()
        return count, await svc.ledger.checkpoint()

    count, latest = _with_ledger(run)
    size = latest.size if latest else 0
    if as_json:
        print(json.dumps({"integrated": count, "tree_size": size}))
    else:
        out.print(f"integrated {count} entries; tree size {size}")


@audit_app.command("export")
def export(
    output: Annotated[Path, typer.Option("--out", help="File to write ('-' for stdout).")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    checkpoint_out: Annotated[
        Path | None, typer.Option(help="Also write the checkpoint the export is complete for.")
    ] = None,
    transaction: Annotated[str | None, typer.Option(help="Only this transaction id.")] = None,
    subject: Annotated[str | None, typer.Option(help="Only this subject.")] = None,
    client_id: Annotated[str | None, typer.Option(help="Only this client.")] = None,
    partner: Annotated[str | None, typer.Option(help="Only this partner.")] = None,
    event_type: Annotated[str | None, typer.Option("--type", help="Only this event type.")] = None,
    since: Annotated[int | None, typer.Option(help="Events at or after (epoch ms).")] = None,
    until: Annotated[int | None, typer.Option(help="Events before (epoch ms).")] = None,
    proofs: Annotated[
        bool, typer.Option(help="Inclusion proofs for every entry (always on with a filter).")
    ] = False,
) -> None:
    """Export entries up to the latest checkpoint as JSONL or CSV, for `trustplane audit verify`."""
    if fmt not in ("jsonl", "csv"):
        err.print("[red]trustplane:[/red] --format must be jsonl or csv")
        raise typer.Exit(2)
    filters: dict[str, Any] = {
        k: v
        for k, v in {
            "transaction_id": transaction,
            "subject": subject,
            "client_id": client_id,
            "partner": partner,
            "type": event_type,
            "since": since,
            "until": until,
        }.items()
        if v is not None
    }

    async def run(svc: Services) -> tuple[int, int]:
        latest = await svc.ledger.checkpoint()
        if latest is None:
            err.print("[red]trustplane:[/red] the log has no checkpoint yet")
            raise typer.Exit(1)
        if checkpoint_out is not None:
            checkpoint_out.write_text(latest.note)
        handle: TextIO = sys.stdout if str(output) == "-" else output.open("w", newline="")
        try:
            written = await _write(svc.ledger, latest, filters, proofs, fmt, handle)
        finally:
            if handle is not sys.stdout:
                handle.close()
        return written, latest.size

    written, size = _with_ledger(run)
    err.print(f"exported {written} entries (tree size {size}) to {output}", highlight=False)


async def _write(
    ledger: Ledger,
    latest: SignedCheckpoint,
    filters: dict[str, Any],
    proofs: bool,
    fmt: str,
    handle: TextIO,
) -> int:
    from trustplane.audit.export_format import export_line

    writer = csv.DictWriter(handle, CSV_COLUMNS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    total = latest.size if not filters else None
    written = 0
    with Progress(
        TextColumn("exporting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("export", total=total)
        async for item, proof in _records(ledger, latest, filters, proofs):
            if writer is not None:
                writer.writerow(_csv_row(item, proof))
            else:
                handle.write(export_line(item, proof).decode())
            written += 1
            if written % 1000 == 0:
                progress.update(task, completed=written)
        progress.update(task, completed=written)
    return written


async def _records(
    ledger: Ledger, latest: SignedCheckpoint, filters: dict[str, Any], proofs: bool
) -> AsyncIterator[tuple[StoredEntry, list[bytes] | None]]:
    if not filters and not proofs:
        async for item in ledger.iter_entries(0, latest.size):
            yield item, None
        return
    after = 0
    while True:
        _cp, page = await ledger.search(filters, after, 500, size=latest.size)
        for proven in page:
            yield proven.entry, proven.proof
        if len(page) < 500:
            return
        after = page[-1].entry.index + 1


def _csv_row(item: StoredEntry, proof: list[bytes] | None) -> dict[str, Any]:
    """One CSV row: a few envelope fields for reading, then the entry and payload verbatim."""
    from trustplane.audit.ledger import b64

    entry = orjson.loads(item.entry)
    return {
        "index": item.index,
        "leaf_hash": b64(item.leaf_hash),
        "type": entry.get("type"),
        "time": entry.get("time"),
        "event_id": entry.get("event_id"),
        "subject": entry.get("subject"),
        "client_id": entry.get("client_id"),
        "partner": entry.get("partner"),
        "transaction_id": entry.get("transaction_id"),
        "entry": item.entry,
        "payload": item.payload or "",
        "salt": b64(item.salt) if item.salt is not None else "",
        "inclusion_proof": " ".join(b64(h) for h in proof or []),
    }


@audit_app.command("tail")
def tail(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming new entries until stopped.")
    ] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="jsonl or syslog (RFC 5424); --syslog implies syslog.")
    ] = "",
    cursor_file: Annotated[
        Path | None,
        typer.Option(help="Resume from and save to this file (the next ledger index)."),
    ] = None,
    syslog_url: Annotated[
        str | None,
        typer.Option(
            "--syslog", help="Send to a syslog receiver: tcp://HOST:PORT or tls://HOST:PORT."
        ),
    ] = None,
    syslog_ca: Annotated[
        Path | None, typer.Option(help="CA bundle that signs the tls:// receiver's certificate.")
    ] = None,
    start: Annotated[
        int | None,
        typer.Option(
            "--from", min=0, help="First ledger index (default 0; not with a saved cursor)."
        ),
    ] = None,
    poll: Annotated[
        float, typer.Option(min=0.05, max=60, help="Seconds between polls with --follow.")
    ] = 0.5,
) -> None:
    """Stream audit events in ledger order to stdout or a syslog receiver (SIEM export). With a
    cursor file, a restarted tail goes on where the last delivered batch ended: nothing skipped."""
    from trustplane.audit.siem import (
        Cursor,
        SiemError,
        StreamDestination,
        SyslogDestination,
        Tail,
        jsonl,
        parse_syslog_url,
        syslog,
    )

    fmt = fmt or ("syslog" if syslog_url else "jsonl")
    try:
        if fmt not in ("jsonl", "syslog"):
            raise SiemError("--format must be jsonl or syslog")
        if syslog_url is not None:
            if fmt != "syslog":
                raise SiemError("--syslog sends RFC 5424 messages: --format must be syslog")
            tls = parse_syslog_url(syslog_url)[2]
            if syslog_ca is not None and not tls:
                raise SiemError("--syslog-ca is for a tls:// receiver")
        context = _tls_context(syslog_ca)
    except SiemError as exc:
        base.fail(str(exc))
    settings = base._settings()
    origin = settings.audit_origin
    hostname = urlsplit(settings.issuer).hostname or "-"
    encode = jsonl if fmt == "jsonl" else (lambda item: syslog(item, hostname))
    cursor = Cursor(cursor_file, origin) if cursor_file is not None else None

    async def run(svc: Services) -> int:
        saved = cursor.load() if cursor is not None else None
        if saved is not None and start is not None:
            raise SiemError(f"--from conflicts with the cursor saved in {cursor_file}")
        destination: Destination = (
            await SyslogDestination.connect(syslog_url, context)
            if syslog_url is not None
            else StreamDestination(sys.stdout.buffer.write, sys.stdout.buffer.flush)
        )
        try:
            streamer = Tail(svc.db, destination, encode, cursor, follow, poll)
            return await streamer.run(saved if saved is not None else start or 0)
        finally:
            await destination.close()

    try:
        delivered_to = _with_ledger(run)
    except SiemError as exc:
        err.print(f"[red]trustplane:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    err.print(f"delivered up to ledger index {delivered_to}", highlight=False)


def _tls_context(ca: Path | None) -> ssl.SSLContext | None:
    from trustplane.audit.siem import SiemError

    if ca is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise SiemError(f"cannot read --syslog-ca {ca}: {exc}") from None


@audit_app.command("verify")
def verify(
    export_file: Annotated[Path, typer.Argument(help="A JSONL or CSV export.")],
    checkpoint_file: Annotated[Path, typer.Option("--checkpoint", help="The signed checkpoint.")],
    key: Annotated[str, typer.Option("--public-key", help="Verifier key, or a file holding it.")],
    workers: Annotated[
        int | None, typer.Option(help="Processes for a large JSONL export (default: CPU count).")
    ] = None,
    check_canonical: Annotated[
        bool,
        typer.Option(help="Also re-serialise every entry and require RFC 8785 form (slower)."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Verify an export offline: checkpoint signature, every leaf, the root or each inclusion proof,
    every payload commitment. Trusts nothing from the server. Exit 1 if anything fails."""
    try:
        note = checkpoint_file.read_text(encoding="utf-8")
        export_file.stat()
    except OSError as exc:
        err.print(f"[red]trustplane:[/red] {exc}")
        raise typer.Exit(2) from None
    from trustplane.audit.parallel_verify import verify_export_file

    started = time.perf_counter()
    try:
        report = verify_export_file(
            export_file, note, _key_text(key), workers, check_canonical=check_canonical
        )
    except (ValueError, KeyError, OSError) as exc:
        err.print(f"[red]trustplane:[/red] the export is malformed: {exc}")
        raise typer.Exit(1) from None
    if report.ok and not as_json:  # after a failure, the failure is all there is to say
        err.print(f"verified in {time.perf_counter() - started:.2f} s", highlight=False)
    _print_report(report, as_json)


@audit_app.command("monitor")
def monitor(
    state: Annotated[Path, typer.Option(help="File keeping the last checkpoint seen.")],
    key: Annotated[str, typer.Option("--public-key", help="Verifier key, or a file holding it.")],
    url: Annotated[
        str | None, typer.Option(help="Server base URL; default: this deployment's database.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token (audit:query) for proofs over HTTP.", envvar="TRUSTPLANE_AUDIT_TOKEN"
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fetch the latest checkpoint and prove it consistent with the last one seen (catches truncation
    and rewriting). Run it from cron; exit 1 on inconsistency (the state file is then kept)."""
    from trustplane.audit.monitor import check_consistency

    verifier_key = _key_text(key)
    old = state.read_text(encoding="utf-8") if state.exists() else None
    if url:
        new, fetch = _http_source(url.rstrip("/"), token)
    else:
        new, fetch = _local_source()
    report, accepted = check_consistency(old, new, verifier_key, fetch)
    if accepted is not None and report.ok:
        tmp = state.with_suffix(state.suffix + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, state)
    _print_report(report, as_json)


def _http_source(url: str, token: str | None) -> tuple[str, ConsistencyFetch]:
    import base64

    import httpx

    response = httpx.get(f"{url}/audit/checkpoint", timeout=30.0)
    if response.status_code != 200:
        err.print(f"[red]trustplane:[/red] GET /audit/checkpoint answered {response.status_code}")
        raise typer.Exit(1)

    def fetch(first: int, second: int) -> list[bytes]:
        if not token:
            raise RuntimeError("a bearer token (--token / TRUSTPLANE_AUDIT_TOKEN) is required")
        answer = httpx.get(
            f"{url}/audit/proof/consistency",
            params={"first": first, "second": second},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
        )
        answer.raise_for_status()
        return [base64.b64decode(h) for h in answer.json()["consistency"]]

    return response.text, fetch


def _local_source() -> tuple[str, ConsistencyFetch]:
    async def latest(svc: Services) -> SignedCheckpoint | None:
        return await svc.ledger.checkpoint()

    found = _with_ledger(latest)
    if found is None:
        err.print("[red]trustplane:[/red] the log has no checkpoint yet")
        raise typer.Exit(1)

    def fetch(first: int, second: int) -> list[bytes]:
        result: list[bytes] = _with_ledger(lambda svc: svc.ledger.consistency(first, second))
        return result

    return str(found.note), fetch


@audit_app.command("purge")
def purge(as_json: JsonFlag = False) -> None:
    """Purge the payloads past their retention period now (leaves and proofs stay; the purge is
    itself audited). Servers run this every minute."""
    purged: dict[str, int] = _with_ledger(lambda svc: svc.ledger.purge())
    if as_json:
        print(json.dumps({"purged": purged}, indent=2, sort_keys=True))
    elif purged:
        for type_, count in sorted(purged.items()):
            out.print(f"purged {count:>8} payloads of {type_}", highlight=False)
    else:
        out.print("nothing is past its retention period")


@audit_app.command("retention")
def retention(as_json: JsonFlag = False) -> None:
    """Show the retention periods (TRUSTPLANE_AUDIT_RETENTION_DAYS) and the payloads now due."""

    async def run(svc: Services) -> tuple[dict[str, int], dict[str, int]]:
        return svc.ledger.retention(), await svc.ledger.due()

    periods, due = _with_ledger(run)
    if as_json:
        print(json.dumps({"retention_days": periods, "due": due}, indent=2, sort_keys=True))
        return
    if not periods:
        out.print("no retention periods configured: payloads are kept forever")
        return
    for type_, days in sorted(periods.items()):
        out.print(f"{type_:<36} {days:>6} days", highlight=False)
    for type_, count in sorted(due.items()):
        out.print(f"due now: {count} payloads of {type_}", highlight=False)
