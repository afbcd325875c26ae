"""Two components of the OAuth core: the replay caches (assertion ``jti`` values, RFC 7523 §3) and
the protocol endpoints (token, introspection, revocation, JWKS, RFC 8414 metadata) on the hot path.

The token endpoint, the client authenticator and the introspection service are built by the
composition root (they take parts of several components) and handed to :class:`Endpoints`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from trustplane.component import Idle, Routes
from trustplane.keys.service import KeyService
from trustplane.oauth.discovery import server_metadata
from trustplane.oauth.introspection import IntrospectionService
from trustplane.oauth.replay import RedisReplayCache, SqlReplayCache
from trustplane.oauth.scopes import Vocabulary
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.storage.writer import GroupCommitWriter


@dataclass
class Replay(Idle):
    """The replay cache the grants and client authentication use (Redis when configured, else
    SQL through the writer). The SQL table is pruned in either case: it is also the fallback record."""

    replay: SqlReplayCache | RedisReplayCache
    sql: SqlReplayCache
    name = "replay"

    async def maintain(self) -> None:
        await self.sql.prune()

    async def close(self) -> None:
        if isinstance(self.replay, RedisReplayCache):
            await self.replay.aclose()


def replay(settings: Settings, db: Database, writer: GroupCommitWriter) -> Replay:
    sql = SqlReplayCache(writer, db)
    return Replay(RedisReplayCache(settings.redis_url) if settings.redis_url else sql, sql)


@dataclass
class Endpoints(Idle):
    """The protocol endpoints, served outside FastAPI (``trustplane.app.TrustplaneApp``)."""

    token_endpoint: TokenEndpoint
    introspection: IntrospectionService
    keys: KeyService
    metadata_json: Callable[[], bytes]
    name = "oauth"

    def routes(self) -> Routes:
        from trustplane.oauth.http import OAuthHttp

        http = OAuthHttp(self.token_endpoint, self.introspection, self.keys, self.metadata_json)
        return Routes(fast=http.routes())


def metadata_json(
    settings: Settings, vocabulary: Vocabulary, verifier_key: Callable[[], str | None]
) -> Callable[[], bytes]:
    """RFC 8414 metadata, serialized once the audit log's key is known (``verifier_key``: it is
    created on the first start, so until then each answer is built without it)."""
    built: list[bytes] = []

    def metadata() -> bytes:
        if not built:
            key = verifier_key()
            body = orjson.dumps(server_metadata(settings, vocabulary, key))
            if key is None:
                return body
            built.append(body)
        return built[0]

    return metadata
