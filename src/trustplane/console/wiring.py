"""Builds the console for the composition root (``trustplane.app``) in one call; None when the
console is off (``TRUSTPLANE_CONSOLE_LEI`` unset)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trustplane.authorize.sealing import Sealer
from trustplane.console.actions import Actions
from trustplane.console.audit_view import AuditView
from trustplane.console.http import ConsoleHttp
from trustplane.console.overview import OverviewService
from trustplane.console.pages import Pages
from trustplane.console.roles import with_console_roles
from trustplane.console.session import Sessions
from trustplane.console.signin import ConsoleClient
from trustplane.protocol.scopes import Vocabulary
from trustplane.settings import Settings

if TYPE_CHECKING:
    from trustplane.services import Services


def vocabulary(settings: Settings, base: Vocabulary) -> Vocabulary:
    """The console's role scopes join the vocabulary only when the console is on."""
    return with_console_roles(base, settings.issuer) if settings.console_lei else base


def build(svc: Services, kek: bytes) -> ConsoleHttp | None:
    settings = svc.settings
    if not settings.console_lei:
        return None
    client = ConsoleClient(settings, svc.clients, svc.token_endpoint, kek)
    sessions = Sessions(settings.issuer, Sealer(kek), settings.session_lifetime)
    overview = OverviewService(
        settings, svc.db, svc.ledger, svc.mandates, svc.keys, svc.clients, svc.federation
    )
    pages = Pages(
        svc.mandates, svc.clients, svc.federation, svc.policy, svc.ledger, svc.authorization.users
    )
    actions = Actions(
        settings.issuer, svc.db, svc.mandates, svc.clients, svc.federation, svc.keys, svc.policy
    )
    return ConsoleHttp(
        settings,
        client,
        sessions,
        svc.authorization.users,
        overview,
        pages,
        AuditView(svc.ledger, svc.mandates),
        actions,
        svc.keys,
    )
