"""``trustplane reference ...``: the reference settlement services' operators' commands.

``exceptions list`` / ``exceptions resolve`` act on the services' store directly (you hold it, as
with ``trustplane mandates``); each resolution is a signed event in the outbox with the actor
``cli:<OS user>``. ``publish`` runs the outbox publisher to NATS JetStream; ``signals`` runs the
Shared Signals receiver that raises exceptions on the trades in flight when the issuer revokes a
token or mandate they rest on (beside a service on the same store). Settings: the
``TRUSTPLANE_REFERENCE_*`` variables (docs/settlement.md).
"""

from __future__ import annotations

import asyncio
import getpass
import uuid
from collections.abc import Mapping
from typing import Annotated, Any

import typer

from trustplane.authzen.model import Decision, Entity
from trustplane.cli.common import JsonFlag, _emit_json, _run, err, fail, out
from trustplane.reference.entitlement import EntitlementUnavailable, MandateStatus
from trustplane.reference.events import EventSigner
from trustplane.reference.services import Caller, Refused, TradeServices
from trustplane.reference.settings import ReferenceSettings, ReferenceSettingsError
from trustplane.reference.store import TradeStore
from trustplane.storage.db import Database

reference_app: typer.Typer = typer.Typer(
    help="Reference settlement services: exceptions, outbox publishing.", no_args_is_help=True
)
exceptions_app: typer.Typer = typer.Typer(
    help="Settlement exceptions (entitlement lost between execution and settlement).",
    no_args_is_help=True,
)
reference_app.add_typer(exceptions_app, name="exceptions")


class _NoSettlement:
    """The CLI never submits a settlement: any mandate question is refused."""

    async def check(
        self, token: str | None, claims: Mapping[str, Any], trade_envelope: Mapping[str, Any]
    ) -> MandateStatus:
        raise EntitlementUnavailable("the command line does not settle")


def _settings() -> ReferenceSettings:
    try:
        return ReferenceSettings.from_env()
    except ReferenceSettingsError as exc:
        fail(str(exc))


async def _open(settings: ReferenceSettings) -> TradeServices:
    signer = EventSigner.from_file(settings.issuer, settings.event_key_file)
    store = TradeStore(Database(settings.database_url), signer)
    await store.create_schema()
    return TradeServices(store, _NoSettlement())


def _operator() -> Caller:
    """The local operator: holding the store is the authority (as for ``trustplane mandates``);
    the decision is recorded as such in the event's envelope."""
    actor = f"cli:{getpass.getuser()}"

    async def decide(action: str, resource: Entity, context: Mapping[str, Any]) -> Decision:
        return Decision(True, ("local-operator",), "cli", f"cli-{uuid.uuid4().hex}")

    return Caller(actor, {"sub": actor, "client_id": "cli"}, None, decide)


@exceptions_app.command("list")
def list_exceptions(
    status: Annotated[
        str | None, typer.Option(help="open, escalated or resolved (default: all)")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List the settlement exceptions."""
    if status not in (None, "open", "escalated", "resolved"):
        fail("--status is open, escalated or resolved")

    async def run() -> list[dict[str, Any]]:
        services = await _open(_settings())
        try:
            return [e.as_dict() for e in await services.list_exceptions(status)]
        finally:
            await services.store.db.dispose()

    found = _run(run())
    if as_json:
        _emit_json(found)
        return
    for e in found:
        out.print(
            f"{e['exception_id']}  {e['status']:<9}  {e['reason']}  from {e['from_state']}",
            highlight=False,
        )
    if not found:
        err.print("no exceptions", highlight=False)


@exceptions_app.command("resolve")
def resolve(
    exception_id: Annotated[str, typer.Argument(help="the exception id (<trade_id>.<n>)")],
    action: Annotated[str, typer.Option(help="reconsent, cancel or escalate")],
    note: Annotated[str, typer.Option(help="why (kept in the signed event)")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Resolve an exception: re-consent (the trade returns to where it stopped), cancel, escalate."""

    async def run() -> dict[str, Any]:
        services = await _open(_settings())
        try:
            record = await services.resolve_exception(_operator(), exception_id, action, note)
            return record.as_dict()
        finally:
            await services.store.db.dispose()

    try:
        record = _run(run())
    except Refused as exc:
        fail(exc.detail, 1)
    if as_json:
        _emit_json(record)
    else:
        out.print(f"{record['exception_id']}: {record['status']}", highlight=False)


@reference_app.command("publish")
def publish() -> None:
    """Publish the outbox to NATS JetStream (TRUSTPLANE_REFERENCE_NATS_URL) until interrupted."""
    from trustplane.reference.jetstream import OutboxPublisher

    settings = _settings()
    if settings.nats_url is None:
        fail("TRUSTPLANE_REFERENCE_NATS_URL is not set")

    async def run() -> None:
        services = await _open(settings)
        assert settings.nats_url is not None
        publisher = OutboxPublisher(services.store, settings.nats_url, prefix=settings.nats_prefix)
        try:
            await publisher.run(asyncio.Event())
        finally:
            await publisher.close()
            await services.store.db.dispose()

    _run(run())


@reference_app.command("signals")
def signals() -> None:
    """Receive the issuer's revocations (SSF poll, TRUSTPLANE_REFERENCE_SSF_*) until interrupted:
    the trades in flight that rest on a revoked token or mandate move to exception."""
    from trustplane.reference.receiver import build_receiver

    settings = _settings()
    if settings.ssf_configuration_url is None:
        fail("TRUSTPLANE_REFERENCE_SSF_CONFIGURATION_URL is not set")

    async def run() -> None:
        services = await _open(settings)
        try:
            receiver, fetcher = build_receiver(settings, services)
        except (ValueError, OSError) as exc:
            await services.store.db.dispose()
            fail(str(exc))
        try:
            await receiver.run(asyncio.Event())
        finally:
            await fetcher.aclose()
            await services.store.db.dispose()

    _run(run())
