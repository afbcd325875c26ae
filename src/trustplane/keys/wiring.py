"""The keys component: the signing key ring, its key-encryption key and its scheduled rotation."""

from __future__ import annotations

from dataclasses import dataclass

from trustplane import metrics
from trustplane.component import Idle
from trustplane.keys.crypto import load_or_create_kek_file
from trustplane.keys.service import GENERATION, AuditWriter, KeyService
from trustplane.keys.store import SqlKeyStore
from trustplane.settings import Settings, SettingsError, decode_kek
from trustplane.storage.db import Database


def key_encryption_key(settings: Settings) -> bytes:
    """The KEK from settings; on the embedded default only, a generated file in the data directory."""
    if settings.key_encryption_key is not None:
        return decode_kek(settings.key_encryption_key.get_secret_value())
    if not settings.is_embedded:
        raise SettingsError(
            "invalid setting TRUSTPLANE_KEY_ENCRYPTION_KEY: required when the database is not the "
            "embedded SQLite file (generate one with `trustplane keys new-kek`)"
        )
    return load_or_create_kek_file(settings.data_dir)


@dataclass
class Keys(Idle):
    """Starts by creating the first signing key if there is none, then loads the ring; reloads it
    when the ``keys`` generation moves (a rotation anywhere); maintenance rotates when the active
    key is due and removes retired keys whose tokens have all expired."""

    service: KeyService
    name = "keys"
    watches = (GENERATION,)

    async def start(self) -> None:
        await self.service.ensure()
        await self.service.load()

    async def reload(self) -> None:
        await self.service.load()
        metrics.CACHE_RELOADS.labels(cache=self.name).inc()

    async def maintain(self) -> None:
        await self.service.maybe_rotate()
        await self.service.prune()


def build(settings: Settings, db: Database, kek: bytes, audit: AuditWriter) -> Keys:
    """``audit`` writes key events in the key change's own transaction (the audit component's
    ``write_events``: this package sits below audit and does not import it)."""
    return Keys(KeyService(db, SqlKeyStore(), settings, kek, audit))
