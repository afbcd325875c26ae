"""``trustplane reference ...``: the reference settlement services' operators' commands.

``exceptions list`` / ``exceptions resolve`` act on the services' store directly (you hold it, as
with ``trustplane mandates``); each resolution is a signed event in the outbox with the actor
``cli:<OS user>``. ``publish`` runs the outbox publisher to NATS JetStream; ``signals`` runs the
Shared Signals receiver that raises exceptions on the trades in flight when the issuer revokes a
token or mandate they rest on (beside a service on the same store); ``forward --to-ledger`` the
forwarder to the authorization server's audit ledger; ``jwks`` prints the event key's JWKS for the
service's client registration. Settings: the
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


@reference_app.command("jwks")
def jwks() -> None:
    """Print the event key's JWKS (register it with ``trustplane clients add --jwks-file``)."""
    settings = _settings()
    _emit_json(EventSigner.from_file(settings.issuer, settings.event_key_file).jwks())


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
            help="EC P-256 PEM key of private_key_jwt (default: the event key; kid = its RFC 7638 "
            "thumbprint).",
            envvar="TRUSTPLANE_REFERENCE_CLIENT_KEY_FILE",
        ),
    ] = None,
    once: Annotated[bool, typer.Option(help="Forward what is there now, then exit.")] = False,
    allow_loopback: Annotated[
        bool, typer.Option(help="Development: the issuer may be http://127.0.0.1.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Forward the outbox's signed events to the authorization server's audit ledger (until
    interrupted; --once: what is there now). Independent of ``publish`` (JetStream)."""
    from pathlib import Path

    from trustplane.outbound import OutboundFetcher, OutboundPolicy
    from trustplane.pep.client_auth import PrivateKeyJwt
    from trustplane.pep.keys import ConfigurationError
    from trustplane.reference.ledger_forwarder import (
        LedgerForwarder,
        LedgerRefused,
        LedgerUnavailable,
    )

    settings = _settings()
    if client_key_file is not None and not Path(client_key_file).is_file():
        fail(f"no key file {client_key_file}")
    key_path = Path(client_key_file) if client_key_file else settings.event_key_file

    async def run() -> int:
        services = await _open(settings)
        signer = EventSigner.from_file(settings.issuer, key_path)
        policy = OutboundPolicy.development() if allow_loopback else OutboundPolicy()
        fetcher = OutboundFetcher(policy)
        auth = PrivateKeyJwt(client_id, signer.key, signer.kid, to_ledger.rstrip("/"))
        try:
            forwarder = LedgerForwarder(services.store, to_ledger, auth, fetcher)
            if once:
                return await forwarder.forward_all()
            await forwarder.run(asyncio.Event())
            return forwarder.delivered
        finally:
            await fetcher.aclose()
            await services.store.db.dispose()

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
