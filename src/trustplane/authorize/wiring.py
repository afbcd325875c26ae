"""The authorization component: users, the legal-entity directory, the authorization endpoint with
its login and consent pages (and PAR, request objects), and what the two delegated grants of the
token endpoint are built with (the code store, the refresh families)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from trustplane.audit.sink import AuditSink, write_events
from trustplane.authorize.answers import SqlAnswerStore
from trustplane.authorize.http import AuthorizeHttp
from trustplane.authorize.login import LocalLogin
from trustplane.authorize.par import PushedRequests, SqlPushedRequestStore
from trustplane.authorize.request_object import RequestObjects
from trustplane.authorize.revocation import DelegatedRevocations
from trustplane.authorize.sealing import Sealer
from trustplane.authorize.service import AuthorizationService
from trustplane.authorize.store import CodeStore, RefreshStore, SqlCodeStore, SqlRefreshStore
from trustplane.clients.authentication import ClientAuthenticator
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.clients.service import ClientRegistry
from trustplane.component import Idle, Routes
from trustplane.entities.service import EntityDirectory
from trustplane.entities.store import SqlEntityStore
from trustplane.mandates.service import MandateService
from trustplane.protocol.replay import ReplayCache
from trustplane.protocol.revocations import RevocationStore
from trustplane.protocol.scopes import Vocabulary
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.users.service import UserService
from trustplane.users.store import SqlUserStore


@dataclass
class Authorization(Idle):
    db: Database
    users: UserService
    entities: EntityDirectory
    service: AuthorizationService
    #: For RFC 7009 revocation of refresh tokens (the introspection service) and the refresh grant.
    revocations: DelegatedRevocations
    http: AuthorizeHttp
    #: For the code and refresh grants (``trustplane.token_wiring.build_token_endpoint``).
    codes: CodeStore
    refresh: RefreshStore
    name = "authorize"

    def routes(self) -> Routes:
        return Routes(api=self.http.routes())

    async def maintain(self) -> None:
        await self.prune()

    async def prune(self) -> int:
        """Delete codes and refresh tokens expired for more than a day (kept that long so that a
        late replay is still recognised as reuse and revokes what it should), and the answered
        requests' ids a day after no consent form carrying them can be opened."""
        before = int(time.time()) - 86400
        async with self.db.transaction() as conn:
            codes = await self.codes.prune(conn, before)
            pushed = await SqlPushedRequestStore().prune(conn, before)  # PAR request_uris
            answered = await SqlAnswerStore().prune(conn, before)
            return codes + pushed + answered + await self.refresh.prune(conn, before)


def build(
    settings: Settings,
    db: Database,
    kek: bytes,
    registry: ClientRegistry,
    vocabulary: Vocabulary,
    details: AuthorizationDetailsRegistry,
    mandates: MandateService,
    audit: AuditSink,
    revocations: RevocationStore,
    *,
    authenticator: ClientAuthenticator,
    replay: ReplayCache,
    remote_jwks: RemoteJwksCache,
) -> Authorization:
    """Wire users and the authorization endpoint; expose the code store and the refresh families
    the two grants of the token endpoint are built with."""
    users = UserService(db, SqlUserStore(), settings, kek, write_events)
    codes, refresh = SqlCodeStore(), SqlRefreshStore()
    entities = EntityDirectory(db, SqlEntityStore())
    # PAR (RFC 9126) and request objects (RFC 9101): client authentication as at /token
    pushed = PushedRequests(settings, db, SqlPushedRequestStore())
    objects = RequestObjects(settings, remote_jwks, replay)
    service = AuthorizationService(
        settings, db, registry, vocabulary, details, mandates, codes, audit, entities,
        pushed, objects, SqlAnswerStore(),
    )  # fmt: skip
    delegated = DelegatedRevocations(
        settings=settings, db=db, refresh=refresh, revocations=revocations, details=details
    )
    http = AuthorizeHttp(settings, service, LocalLogin(users), Sealer(kek), authenticator)
    return Authorization(db, users, entities, service, delegated, http, codes, refresh)
