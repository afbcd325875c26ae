"""``trustplane demo``: the reference lifecycle across three local deployments (``trustplane.demo``)."""

from __future__ import annotations

import json
import signal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from trustplane.demo import run_demo
from trustplane.logging import configure_logging


class NatsMode(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(help="Keep the deployments' files here (default: a temporary directory)."),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="The servers' log level (their logs are in the work directory).")
    ] = "warning",
    as_json: Annotated[bool, typer.Option("--json", help="Print only a JSON summary.")] = False,
    nats: Annotated[
        NatsMode, typer.Option(help="The services' events: NATS JetStream if reachable (auto).")
    ] = NatsMode.auto,
) -> None:
    """Start three deployments (arranger, broker, clearing) and the reference services on
    loopback, run the whole reference lifecycle (the mandate revoked before settlement
    included), print the chain of authority, verify each ledger offline, stop everything."""
    configure_logging("warning", "console")
    console = Console(quiet=as_json, highlight=False)
    if workdir is not None and any(workdir.iterdir() if workdir.exists() else ()):
        raise typer.BadParameter(f"{workdir} is not empty", param_hint="--workdir")
    # SIGTERM (a supervisor, `timeout`) stops the children as Ctrl-C does: through run_demo's finally
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_demo(workdir, log_level, nats.value, console)
    except KeyboardInterrupt:  # run_demo has stopped everything it started before re-raising
        console.print("\n[yellow]interrupted[/]: every process the demo started is stopped")
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(console, summary)
    if not summary["ok"]:
        raise typer.Exit(1)


def _short(value: str) -> str:
    return value[:8] + "…" if len(value) > 9 else value


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.print()
    if not summary["ok"]:
        console.print(f"[bold red]FAILED:[/] {summary.get('error')}")
        for name, tail in (summary.get("logs") or {}).items():
            console.print(f"[dim]--- {name} (log tail) ---[/]")
            console.print(tail, markup=False, highlight=False)
        return
    table = Table(title="trustplane demo", show_header=True, header_style="bold")
    table.add_column("step")
    table.add_column("what")
    table.add_column("s", justify="right")
    for step in summary.get("steps", []):
        table.add_row(step["step"], step["title"], f"{step.get('seconds', 0):.1f}")
    console.print(table)
    trade, exception = summary["trade"], summary["exception"]
    events = summary.get("events", {})
    nats = summary.get("nats")
    console.print(f"[green]settled[/]    trade {_short(trade['trade_id'])}, txn {trade['txn']}")
    console.print(
        f"[red]exception[/]  trade {_short(exception['trade_id'])}: {exception['code']} "
        f"({exception['reason']}); deny in the clearing's ledger; cancelled by an operator"
    )
    where = f"acknowledged by NATS ({events.get('published_to_nats')})" if nats else "outbox only"
    console.print(f"events     {events.get('count')} signed and verified; {where}")
    ledgers = ", ".join(f"{n} {r['entries']}" for n, r in summary.get("ledgers", {}).items())
    console.print(f"ledgers    verified offline: {ledgers} entries")
    stopped = summary["stopped"]
    console.print(
        f"stopped    {stopped['processes']} processes in {stopped['seconds']:.1f} s; "
        f"total {summary['seconds']:.1f} s"
    )
    if summary.get("workdir"):
        console.print(f"files      {summary['workdir']}")
