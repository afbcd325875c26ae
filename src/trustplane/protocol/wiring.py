"""The replay-cache component: single-use ``jti`` values of client assertions, partner assertions,
request objects and DPoP proofs (RFC 7523 §3, RFC 9101, RFC 9449), in Redis when configured, else in
SQL through the group-commit writer."""

from __future__ import annotations

from dataclasses import dataclass

from trustplane.component import Idle
from trustplane.protocol.replay import RedisReplayCache, SqlReplayCache
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


def build(settings: Settings, db: Database, writer: GroupCommitWriter) -> Replay:
    sql = SqlReplayCache(writer, db)
    return Replay(RedisReplayCache(settings.redis_url) if settings.redis_url else sql, sql)
