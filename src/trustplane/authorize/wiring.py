"""Builds this package's services for the composition root (``trustplane.app``) in one call."""

from __future__ import annotations

import time
from dataclasses import dataclass

from trustplane.audit.sink import AuditSink, write_events
from trustplane.authorize.http import AuthorizeHttp
from trustplane.authorize.login import LocalLogin
from trustplane.authorize.revocation import DelegatedRevocations
from trustplane.authorize.sealing import Sealer
from trustplane.authorize.service import AuthorizationService
from trustplane.authorize.store import SqlCodeStore, SqlRefreshStore
from trustplane.clients.service import ClientRegistry
from trustplane.entities.service import EntityDirectory
from trustplane.entities.store import SqlEntityStore
from trustplane.mandates.service import MandateService
from trustplane.oauth.revocations import SqlRevocationStore
from trustplane.oauth.scopes import Vocabulary
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.users.service import UserService
from trustplane.users.store import SqlUserStore


@dataclass
class Authorization:
    db: Database
    users: UserService
    entities: EntityDirectory
    service: AuthorizationService
    #: For the code and refresh grants (``oauth.wiring.build_token_endpoint``) and for RFC 7009
    #: revocation of refresh tokens (the introspection service).
    codes: SqlCodeStore
    revocations: DelegatedRevocations
    http: AuthorizeHttp

    async def prune(self) -> int:
        """Delete codes and refresh tokens expired for more than a day (kept that long so that a
        late replay is still recognised as reuse and revokes what it should)."""
        before = int(time.time()) - 86400
        async with self.db.transaction() as conn:
            codes = await SqlCodeStore().prune(conn, before)
            return codes + await SqlRefreshStore().prune(conn, before)


def build(
    settings: Settings,
    db: Database,
    kek: bytes,
    registry: ClientRegistry,
    vocabulary: Vocabulary,
    details: AuthorizationDetailsRegistry,
    mandates: MandateService,
    audit: AuditSink,
) -> Authorization:
    """Wire users and the authorization endpoint; expose the code store and the refresh families
    the two grants of the token endpoint are built with."""
    users = UserService(db, SqlUserStore(), settings, kek, write_events)
    codes = SqlCodeStore()
    entities = EntityDirectory(db, SqlEntityStore())
    service = AuthorizationService(
        settings, db, registry, vocabulary, details, mandates, codes, audit, entities
    )
    revocations = DelegatedRevocations(
        settings=settings,
        db=db,
        refresh=SqlRefreshStore(),
        revocations=SqlRevocationStore(),
        details=details,
    )
    http = AuthorizeHttp(settings, service, LocalLogin(users), Sealer(kek))
    return Authorization(db, users, entities, service, codes, revocations, http)
