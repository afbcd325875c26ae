"""Key storage. Every state change is a conditional UPDATE so that two processes rotating at once
cannot both win: the loser sees ``False`` and its transaction is rolled back by the caller."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane.keys.tables import signing_keys


class KeyState(StrEnum):
    NEXT = "next"
    ACTIVE = "active"
    RETIRED = "retired"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class StoredKey:
    kid: str
    alg: str
    state: KeyState
    public_jwk: dict[str, Any]
    private_key: bytes | None
    created_at: int
    activated_at: int | None
    retired_at: int | None
    remove_after: int | None


class KeyStore(Protocol):
    async def list(
        self, conn: AsyncConnection, *, include_removed: bool = False
    ) -> list[StoredKey]:
        """All keys, newest first; removed ones only when asked."""

    async def add(self, conn: AsyncConnection, key: StoredKey) -> None:
        """Insert a new key (state NEXT or ACTIVE)."""

    async def transition(
        self, conn: AsyncConnection, kid: str, old: KeyState, new: KeyState, now: int, **values: Any
    ) -> bool:
        """Move ``kid`` from ``old`` to ``new``; False (nothing written) if it was not in ``old``."""


class SqlKeyStore:
    async def list(
        self, conn: AsyncConnection, *, include_removed: bool = False
    ) -> list[StoredKey]:
        query = select(signing_keys).order_by(signing_keys.c.created_at.desc())
        if not include_removed:
            query = query.where(signing_keys.c.state != KeyState.REMOVED.value)
        rows = (await conn.execute(query)).mappings().all()
        return [
            StoredKey(
                kid=r["kid"],
                alg=r["alg"],
                state=KeyState(r["state"]),
                public_jwk=orjson.loads(r["public_jwk"]),
                private_key=r["private_key"],
                created_at=r["created_at"],
                activated_at=r["activated_at"],
                retired_at=r["retired_at"],
                remove_after=r["remove_after"],
            )
            for r in rows
        ]

    async def add(self, conn: AsyncConnection, key: StoredKey) -> None:
        await conn.execute(
            insert(signing_keys).values(
                kid=key.kid,
                alg=key.alg,
                state=key.state.value,
                public_jwk=orjson.dumps(key.public_jwk).decode(),
                private_key=key.private_key,
                created_at=key.created_at,
                activated_at=key.activated_at,
            )
        )

    async def transition(
        self, conn: AsyncConnection, kid: str, old: KeyState, new: KeyState, now: int, **values: Any
    ) -> bool:
        stamp = {
            KeyState.ACTIVE: "activated_at",
            KeyState.RETIRED: "retired_at",
            KeyState.REMOVED: "removed_at",
        }
        if new in stamp:
            values[stamp[new]] = now
        if new is KeyState.REMOVED:
            values["private_key"] = None
        result = await conn.execute(
            update(signing_keys)
            .where(signing_keys.c.kid == kid, signing_keys.c.state == old.value)
            .values(state=new.value, **values)
        )
        return bool(result.rowcount == 1)
