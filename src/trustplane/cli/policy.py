"""``trustplane policy ...``: the bundle lifecycle from the command line.

Exit codes: 0 success; 1 the bundle is refused (validation or tests fail), the operation conflicts,
or a simulation exceeds its threshold (so CI can gate on it); 2 a usage or settings error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO, TypeVar, cast

import cedarpy
import structlog
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from trustplane.cli.common import JsonFlag, _run, _settings, check_schema, err, open_database, out
from trustplane.logging import configure_logging
from trustplane.policy.bundle import BundleError, BundleSource, compile_bundle, load_dir
from trustplane.policy.service import PolicyService, PublishRefused, check_bundle
from trustplane.policy.store import Activation, ActivationConflict, UnknownBundle

if TYPE_CHECKING:
    from trustplane.policy.simulate import SimulationReport

T = TypeVar("T")
policy_app = typer.Typer(
    help="Policy bundles: validate, test, publish, activate, roll back, diff, simulate.",
    no_args_is_help=True,
)
BundleDir = Annotated[
    Path, typer.Argument(help="Bundle directory (schema.cedarschema, *.cedar, tests/).")
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]trustplane:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _load(path: Path) -> BundleSource:
    try:
        return load_dir(path)
    except BundleError as exc:
        raise _fail(str(exc), 2) from None


async def _with_policy(fn: Callable[[PolicyService], Awaitable[T]]) -> T:
    from trustplane.policy.engine import PolicyEngine
    from trustplane.policy.store import SqlBundleStore

    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _Stderr()))
    )  # stdout is output
    db = await open_database(settings, create=False)
    try:
        await check_schema(settings, db)
        regions = tuple(settings.policy_served_regions)
        engine = PolicyEngine(issuer=settings.issuer, served_regions=regions, observe=False)
        service = PolicyService(db, SqlBundleStore(), engine, issuer=settings.issuer)
        return await fn(service)
    finally:
        await db.dispose()


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _emit(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "-"


def _problems(title: str, problems: list[str], as_json: bool) -> typer.Exit:
    if as_json:
        _emit({"ok": False, "problems": problems})
    else:
        err.print(f"[red]{escape(title)}[/red]")
        for problem in problems:
            err.print(f"  - {escape(problem)}", highlight=False)
    return typer.Exit(1)


@policy_app.command()
def validate(path: BundleDir, as_json: JsonFlag = False) -> None:
    """Parse the schema and policies and type-check the policies against the schema."""
    source = _load(path)
    try:
        compiled = compile_bundle(source)
    except BundleError as exc:
        raise _problems("bundle does not validate:", exc.problems, as_json) from None
    if as_json:
        _emit({"ok": True, "version": compiled.version, "policies": list(compiled.policy_ids)})
        return
    out.print(f"[green]valid[/green] {compiled.version}  ({len(compiled.policy_ids)} policies)")


@policy_app.command("test")
def run_tests(path: BundleDir, as_json: JsonFlag = False) -> None:
    """Validate, then run the bundle's test cases (tests/*.yaml)."""
    source = _load(path)
    try:
        compiled, results = check_bundle(source)
    except PublishRefused as exc:
        raise _problems("bundle refused:", exc.problems, as_json) from None
    if as_json:
        cases = [dataclasses.asdict(r) for r in results]
        _emit({"ok": True, "version": compiled.version, "cases": cases})
        return
    out.print(f"[green]{len(results)} cases passed[/green] for bundle {compiled.version[:12]}")


@policy_app.command()
def publish(
    path: BundleDir,
    change_ref: Annotated[str, typer.Option("--change-ref", help="Change request, e.g. CR-1042.")],
    author: Annotated[str, typer.Option("--author", help="Who authored the change.")],
    activate: Annotated[bool, typer.Option("--activate", help="Activate it too.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Validate, run the tests, and store the bundle under its content version."""
    source = _load(path)
    try:
        check_bundle(source)  # refuse before touching the database
    except PublishRefused as exc:
        raise _problems("publish refused:", exc.problems, as_json) from None

    async def go(service: PolicyService) -> dict[str, Any]:
        published = await service.publish(source, change_ref, author)
        result = {
            "version": published.record.version,
            "created": published.created,
            "change_ref": published.record.change_ref,
            "author": published.record.author,
            "tests": len(published.tests),
        }
        if activate:
            activation = await service.activate(published.record.version, author, change_ref)
            result["activated"] = True
            result["previous_version"] = activation.previous_version
        return result

    try:
        result = _run(_with_policy(go))
    except PublishRefused as exc:
        raise _problems("publish refused:", exc.problems, as_json) from None
    except ActivationConflict as exc:
        raise _fail(str(exc)) from None
    if as_json:
        _emit(result)
        return
    what = "published" if result["created"] else "already published (unchanged)"
    out.print(f"{what} {result['version']}  change {result['change_ref']}  by {result['author']}")
    if result.get("activated"):
        out.print(f"[green]active[/green] {result['version'][:12]}")


@policy_app.command()
def activate(
    version: Annotated[str, typer.Argument(help="Version (or a prefix of 8+ characters).")],
    actor: Annotated[str, typer.Option("--actor", help="Who activates.")] = "cli",
    change_ref: Annotated[str | None, typer.Option("--change-ref")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Make a published bundle the active one (every process switches within the refresh interval)."""

    async def go(service: PolicyService) -> Activation:
        return await service.activate(version, actor, change_ref)

    _report_activation(go, as_json)


@policy_app.command()
def rollback(
    actor: Annotated[str, typer.Option("--actor", help="Who rolls back.")] = "cli",
    change_ref: Annotated[str | None, typer.Option("--change-ref")] = None,
    from_version: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="The bundle you mean to roll back (version or prefix); refused if it is not active.",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Re-activate the bundle that was active before the latest activation."""

    async def go(service: PolicyService) -> Activation:
        return await service.rollback(actor, change_ref, from_version=from_version)

    _report_activation(go, as_json)


def _report_activation(go: Callable[[PolicyService], Awaitable[Activation]], as_json: bool) -> None:
    try:
        activation = _run(_with_policy(go))
    except (ActivationConflict, UnknownBundle) as exc:
        raise _fail(str(exc).strip("'\"")) from None
    if as_json:
        _emit(dataclasses.asdict(activation))
        return
    previous = (activation.previous_version or "none")[:12]
    out.print(f"[green]active[/green] {activation.version}  (was {previous})")


@policy_app.command("list")
def list_cmd(as_json: JsonFlag = False) -> None:
    """Published bundles and the activation history."""
    records, history = _run(_with_policy(lambda s: s.list()))
    if as_json:
        _emit(
            {
                "bundles": [
                    dataclasses.asdict(dataclasses.replace(r, source=None)) for r in records
                ],
                "activations": [dataclasses.asdict(a) for a in history],
            }
        )
        return
    table = Table("version", "status", "change", "author", "published")
    for r in records:
        style = "green" if r.status == "active" else None
        table.add_row(
            r.version[:12], r.status, r.change_ref, r.author, _when(r.created_at), style=style
        )
    out.print(table)
    if history:
        table = Table("when", "action", "version", "previous", "actor", "change")
        for a in history[:10]:
            table.add_row(
                _when(a.time_ms),
                a.action,
                a.version[:12],
                (a.previous_version or "-")[:12],
                a.actor,
                a.change_ref or "-",
            )
        out.print(table)


@policy_app.command()
def diff(
    old: Annotated[str, typer.Argument(help="A bundle directory or a published version.")],
    new: Annotated[str, typer.Argument(help="A bundle directory or a published version.")],
    as_json: JsonFlag = False,
) -> None:
    """What changed between two bundles: files, and policies by @id."""
    a, b = _source(old), _source(new)
    result = bundle_diff(a, b)
    if as_json:
        _emit(result)
        return
    out.print(f"{a.version[:12]} -> {b.version[:12]}")
    for key, colour in (("added", "green"), ("removed", "red"), ("changed", "yellow")):
        for name in result["files"][key]:
            out.print(f"  file   [{colour}]{key:8}[/{colour}] {escape(name)}")
        for name in result["policies"][key]:
            out.print(f"  policy [{colour}]{key:8}[/{colour}] {escape(name)}")
    if a.version == b.version:
        out.print("  identical")


def _source(ref: str) -> BundleSource:
    path = Path(ref)
    if path.is_dir():
        return _load(path)

    async def go(service: PolicyService) -> BundleSource:
        record = await service.get(ref)
        assert record.source is not None
        return record.source

    try:
        return _run(_with_policy(go))
    except UnknownBundle as exc:
        raise _fail(f"{ref}: not a directory, and {str(exc).strip(chr(34))}", 2) from None


def _policies_by_id(source: BundleSource) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in source.policy_files:
        try:
            tree = cedarpy.PolicySet.from_str(source.files[name]).to_pst()
        except ValueError:
            continue
        for policy in tree.static_policies.values():
            pid = policy.annotations.get("id") or f"{name}:{policy.id}"
            found[pid] = dataclasses.replace(policy, id="")
    return found


def bundle_diff(a: BundleSource, b: BundleSource) -> dict[str, Any]:
    def compare(x: dict[str, Any], y: dict[str, Any]) -> dict[str, list[str]]:
        return {
            "added": sorted(set(y) - set(x)),
            "removed": sorted(set(x) - set(y)),
            "changed": sorted(k for k in set(x) & set(y) if x[k] != y[k]),
        }

    return {
        "old_version": a.version,
        "new_version": b.version,
        "files": compare(dict(a.files), dict(b.files)),
        "policies": compare(_policies_by_id(a), _policies_by_id(b)),
    }


_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def parse_since(value: str) -> int:
    """Epoch milliseconds from ``2026-11-01``, ``2026-11-01T12:00:00Z``, ``24h``/``7d``, or epoch seconds."""
    match = _RELATIVE.match(value)
    if match:
        seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return (int(time.time()) - seconds) * 1000
    if value.isdigit():
        return int(value) * 1000
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            "use an ISO 8601 time, epoch seconds, or a relative time like 24h or 7d"
        ) from None
    if parsed.tzinfo is None:
        raise typer.BadParameter("give a time zone (e.g. 2026-11-01T00:00:00Z)")
    return int(parsed.timestamp() * 1000)


@policy_app.command()
def simulate(
    bundle: Annotated[Path, typer.Option("--bundle", help="Candidate bundle directory.")],
    since: Annotated[
        str | None, typer.Option(help="Replay decisions from this time (ISO 8601, 24h, 7d).")
    ] = None,
    max_flips: Annotated[
        int | None, typer.Option("--max-flips", min=0, help="Exit 1 above this many flips.")
    ] = None,
    max_flip_rate: Annotated[
        float | None,
        typer.Option("--max-flip-rate", min=0.0, max=1.0, help="Exit 1 above this flip rate."),
    ] = None,
    examples: Annotated[int, typer.Option(min=0, max=100, help="Examples per direction.")] = 5,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Worker processes (default: the CPU count).")
    ] = max(1, os.cpu_count() or 1),
    as_json: JsonFlag = False,
) -> None:
    """Replay recorded decisions against a candidate bundle; report allow->deny and deny->allow."""
    from trustplane.policy.simulate import count_recorded
    from trustplane.policy.simulate import simulate as run_simulation

    since_ms = parse_since(since) if since else None
    source = _load(bundle)
    try:
        compiled, _ = check_bundle(source)
    except PublishRefused as exc:
        raise _problems("candidate bundle refused:", exc.problems, as_json) from None

    async def go(service: PolicyService) -> SimulationReport:
        async with service.db.read() as conn:
            total = await count_recorded(conn, since_ms)
        with Progress(
            TextColumn("replaying"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=as_json or total < 10_000,
            transient=True,
        ) as progress:
            task = progress.add_task("replay", total=total)
            return await run_simulation(
                service.db,
                compiled,
                since_ms=since_ms,
                examples=examples,
                workers=workers if total >= 20_000 else 1,
                progress=lambda n: progress.advance(task, n),
            )

    report = _run(_with_policy(go))
    exceeded = report.exceeds(max_flips, max_flip_rate)
    if as_json:
        _emit({**report.to_dict(), "exceeded": exceeded})
    else:
        _print_report(report.to_dict(), exceeded)
    if exceeded:
        raise typer.Exit(1)


def _print_report(r: dict[str, Any], exceeded: bool) -> None:
    out.print(
        f"candidate {r['candidate_version'][:12]}: replayed {r['replayed']} of {r['total']} "
        f"recorded decisions in {r['elapsed_s']}s ({r['decisions_per_second']}/s)"
    )
    table = Table("change", "count", "reason ids responsible")
    for key, label in (("allow_to_deny", "allow -> deny"), ("deny_to_allow", "deny -> allow")):
        reasons = ", ".join(f"{k} ({v})" for k, v in r["by_reason"][key].items()) or "-"
        table.add_row(label, str(r["flips"][key]), reasons)
    table.add_row("unchanged", str(r["unchanged"]), f"{r['reasons_changed']} with other reasons")
    out.print(table)
    for key in ("allow_to_deny", "deny_to_allow"):
        for ex in r["examples"][key]:
            out.print(
                f"  {key}: {escape(ex['principal'])} {ex['action']} {escape(ex['resource'])} "
                f"{ex['recorded_reason_ids']} -> {ex['candidate_reason_ids']}  ({ex['decision_id']})",
                highlight=False,
            )
    if exceeded:
        err.print(
            f"[red]flips ({r['flip_count']}, rate {r['flip_rate']:.4%}) exceed the threshold[/red]"
        )
