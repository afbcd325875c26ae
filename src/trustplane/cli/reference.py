"""``trustplane reference ...``: the reference settlement services' operators' commands.

Each service has its own store (docs/settlement.md, "Stores"). ``exceptions list`` /
``exceptions resolve`` act on the settlement's store directly (you hold it, as with ``trustplane
mandates``); each resolution is a signed event in the settlement's outbox with the actor
``cli:<OS user>``, handed to the other stores before the command returns. ``publish`` runs the
outbox publishers of the owners this deployment runs (``TRUSTPLANE_REFERENCE_SERVICES``) to NATS
JetStream; ``signals`` runs the Shared Signals receiver, the settlement's: it raises exceptions on
the trades in flight when the issuer revokes a token or mandate they rest on; ``forward
--to-ledger`` forwards the owners' outboxes (``--service``, default all three) to the authorization
server's audit ledger; ``jwks`` prints the owners' event keys as one JWKS for the services' client
registration. Settings: the ``TRUSTPLANE_REFERENCE_*`` variables (docs/settlement.md).
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
from trustplane.reference import machine
from trustplane.reference.entitlement import EntitlementUnavailable, MandateStatus
from trustplane.reference.services import Caller, Refused, TradeServices
from trustplane.reference.settings import ReferenceSettings, ReferenceSettingsError

reference_app: typer.Typer = typer.Typer(
    help="Reference settlement services: exceptions, outbox publishing and forwarding.",
    no_args_is_help=True,
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
    """Every service's store, and the hand-off from the settlement's (what the command changes
    there, the other stores learn before it returns)."""
    from trustplane.reference.serve import create_schemas, dispatcher_of, open_stores

    stores = open_stores(settings)
    await create_schemas(stores)
    return TradeServices(
        stores, _NoSettlement(), handoff=dispatcher_of(stores, (machine.SETTLEMENT,))
    )


async def _close(services: TradeServices) -> None:
    from trustplane.reference.serve import dispose

    await dispose(services.stores)


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
            await _close(services)

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
            await _close(services)

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
    """Publish the outboxes of the owners this deployment runs (TRUSTPLANE_REFERENCE_SERVICES) to
    NATS JetStream (TRUSTPLANE_REFERENCE_NATS_URL) until interrupted."""
    from trustplane.reference.jetstream import OutboxPublisher

    settings = _settings()
    if settings.nats_url is None:
        fail("TRUSTPLANE_REFERENCE_NATS_URL is not set")

    async def run() -> None:
        services = await _open(settings)
        assert settings.nats_url is not None
        publishers = [
            OutboxPublisher(store, settings.nats_url, prefix=settings.nats_prefix)
            for service, store in services.stores.by_service().items()
            if service in machine.OWNERS and service in settings.services
        ]
        try:
            await asyncio.gather(*(p.run(asyncio.Event()) for p in publishers))
        finally:
            for publisher in publishers:
                await publisher.close()
            await _close(services)

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
            await _close(services)
            fail(str(exc))
        try:
            await receiver.run(asyncio.Event())
        finally:
            await fetcher.aclose()
            await _close(services)

    _run(run())


@reference_app.command("jwks")
def jwks() -> None:
    """Print the owners' event keys as one JWKS (register it with ``trustplane clients add
    --jwks-file``: the ledger accepts the events signed by any of them)."""
    from trustplane.reference.serve import open_stores

    _emit_json(open_stores(_settings()).jwks())


@reference_app.command("forward")
def forward(
    to_ledger: Annotated[
        str,
        typer.Option(
            "--to-ledger",
            help="The authorization server's issuer URL: events go to {issuer}/audit/events.",
            envvar="TRUSTPLANE_REFERENCE_LEDGER_ISSUER",
        ),
    ],
    client_id: Annotated[
        str,
        typer.Option(
            help="The service's client (audit:ingest for {issuer}/audit, --resource-server "
            "for the events' iss).",
            envvar="TRUSTPLANE_REFERENCE_CLIENT_ID",
        ),
    ],
    client_key_file: Annotated[
        str | None,
        typer.Option(
            help="EC P-256 PEM key of private_key_jwt (default: the settlement's event key; kid = "
            "its RFC 7638 thumbprint).",
            envvar="TRUSTPLANE_REFERENCE_CLIENT_KEY_FILE",
        ),
    ] = None,
    service: Annotated[
        str,
        typer.Option(help="Whose outbox: execution, allocation, settlement or all (the three)."),
    ] = "all",
    once: Annotated[bool, typer.Option(help="Forward what is there now, then exit.")] = False,
    allow_loopback: Annotated[
        bool, typer.Option(help="Development: the issuer may be http://127.0.0.1.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Forward the owners' signed events to the authorization server's audit ledger (each owner's
    outbox, --service; until interrupted; --once: what is there now). Independent of ``publish``
    (JetStream)."""
    from pathlib import Path

    from trustplane.outbound import OutboundFetcher, OutboundPolicy
    from trustplane.pep.client_auth import PrivateKeyJwt
    from trustplane.pep.keys import ConfigurationError
    from trustplane.reference.events import EventSigner
    from trustplane.reference.ledger_forwarder import (
        LedgerForwarder,
        LedgerRefused,
        LedgerUnavailable,
    )

    settings = _settings()
    if service not in ("all", *machine.OWNERS):
        fail("--service is execution, allocation, settlement or all")
    if client_key_file is not None and not Path(client_key_file).is_file():
        fail(f"no key file {client_key_file}")
    key_path = (
        Path(client_key_file) if client_key_file else settings.event_key_file_of(machine.SETTLEMENT)
    )
    owners = machine.OWNERS if service == "all" else (service,)

    async def run() -> int:
        services = await _open(settings)
        signer = EventSigner.from_file(settings.issuer, key_path)
        policy = OutboundPolicy.development() if allow_loopback else OutboundPolicy()
        fetcher = OutboundFetcher(policy)
        auth = PrivateKeyJwt(client_id, signer.key, signer.kid, to_ledger.rstrip("/"))
        stores = services.stores.by_service()
        try:
            forwarders = [LedgerForwarder(stores[o], to_ledger, auth, fetcher) for o in owners]
            if once:
                return sum([await f.forward_all() for f in forwarders])
            await asyncio.gather(*(f.run(asyncio.Event()) for f in forwarders))
            return sum(f.delivered for f in forwarders)
        finally:
            await fetcher.aclose()
            await _close(services)

    try:
        delivered = _run(run())
    except ConfigurationError as exc:
        fail(str(exc))
    except (LedgerRefused, LedgerUnavailable) as exc:
        fail(str(exc), 1)
    if as_json:
        _emit_json({"delivered": delivered})
    else:
        out.print(f"{delivered} event(s) delivered to the ledger", highlight=False)
