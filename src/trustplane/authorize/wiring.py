"""The authorization component: users, the legal-entity directory, the authorization endpoint with
its login and consent pages, and the two delegated grants (authorization code, refresh token)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from trustplane.audit.sink import AuditSink, write_events
from trustplane.authorize.grants import DelegatedGrants
from trustplane.authorize.http import AuthorizeHttp
from trustplane.authorize.login import LocalLogin
from trustplane.authorize.par import PushedRequests, SqlPushedRequestStore
from trustplane.authorize.request_object import RequestObjects
from trustplane.authorize.sealing import Sealer
from trustplane.authorize.service import AuthorizationService
from trustplane.authorize.store import CodeStore, RefreshStore, SqlCodeStore, SqlRefreshStore
from trustplane.clients.authentication import ClientAuthenticator
from trustplane.clients.remote_jwks import RemoteJwksCache
from trustplane.clients.service import ClientRegistry
from trustplane.component import Idle, Routes
from trustplane.entities.service import EntityDirectory
from trustplane.entities.store import SqlEntityStore
from trustplane.keys.service import KeyService
from trustplane.mandates.service import MandateService
from trustplane.oauth.introspection import IntrospectionService
from trustplane.oauth.token_endpoint import TokenEndpoint
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
    """Nothing cached across processes (codes, refresh tokens, users and entities are read per
    request); maintenance deletes expired codes and refresh tokens. The pages go through FastAPI."""

    db: Database
    users: UserService
    entities: EntityDirectory
    service: AuthorizationService
    grants: DelegatedGrants
    http: AuthorizeHttp
    codes: CodeStore
    refresh: RefreshStore
    name = "authorize"

    def routes(self) -> Routes:
        return Routes(api=self.http.routes())

    async def maintain(self) -> None:
        await self.prune()

    async def prune(self) -> int:
        """Delete codes and refresh tokens expired for more than a day (kept that long so that a
        late replay is still recognised as reuse and revokes what it should)."""
        before = int(time.time()) - 86400
        async with self.db.transaction() as conn:
            codes = await self.codes.prune(conn, before)
            pushed = await SqlPushedRequestStore().prune(conn, before)  # PAR request_uris
            return codes + pushed + await self.refresh.prune(conn, before)


def build(
    settings: Settings,
    db: Database,
    kek: bytes,
    keys: KeyService,
    registry: ClientRegistry,
    vocabulary: Vocabulary,
    details: AuthorizationDetailsRegistry,
    mandates: MandateService,
    audit: AuditSink,
    token_endpoint: TokenEndpoint,
    introspection: IntrospectionService,
    revocations: RevocationStore,
    *,
    authenticator: ClientAuthenticator,
    replay: ReplayCache,
    remote_jwks: RemoteJwksCache,
) -> Authorization:
    """Wire users, the authorization endpoint and the two grants (registered on the token endpoint)."""
    users = UserService(db, SqlUserStore(), settings, kek, write_events)
    codes, refresh = SqlCodeStore(), SqlRefreshStore()
    entities = EntityDirectory(db, SqlEntityStore())
    # PAR (RFC 9126) and request objects (RFC 9101): client authentication as at /token
    pushed = PushedRequests(settings, db, SqlPushedRequestStore())
    objects = RequestObjects(settings, remote_jwks, replay)
    service = AuthorizationService(
        settings, db, registry, vocabulary, details, mandates, codes, audit, entities,
        pushed, objects,
    )  # fmt: skip
    grants = DelegatedGrants(
        settings,
        db,
        keys,
        mandates,
        details,
        codes,
        refresh,
        revocations,
        authorize=token_endpoint.authorize_scopes,
    )
    token_endpoint.grants.update(grants.handlers())
    introspection.refresh_tokens = grants
    http = AuthorizeHttp(settings, service, LocalLogin(users), Sealer(kek), authenticator)
    return Authorization(db, users, entities, service, grants, http, codes, refresh)
