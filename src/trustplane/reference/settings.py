"""The reference services' own settings (not the authorization server's), from the environment:

================================================  ==========================================
``TRUSTPLANE_REFERENCE_DATABASE_URL``             the services' store (default: SQLite file
                                                  ``.trustplane/reference.db``)
``TRUSTPLANE_REFERENCE_EVENT_KEY_FILE``           the ES256 event key, PEM, created on first
                                                  use (default ``.trustplane/reference-events.pem``)
``TRUSTPLANE_REFERENCE_ISSUER``                   ``iss`` of the events (default
                                                  ``https://reference.invalid``)
``TRUSTPLANE_REFERENCE_NATS_URL``                 publish the outbox to JetStream (unset: only
                                                  ``GET /events``)
``TRUSTPLANE_REFERENCE_NATS_PREFIX``              subject and stream prefix (default ``tp``)
================================================  ==========================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "TRUSTPLANE_REFERENCE_"
_NATS_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,31}")


class ReferenceSettingsError(ValueError):
    """A setting with a value that cannot work, named by its variable."""


@dataclass(frozen=True)
class ReferenceSettings:
    database_url: str = "sqlite+aiosqlite:///.trustplane/reference.db"
    event_key_file: Path = Path(".trustplane/reference-events.pem")
    issuer: str = "https://reference.invalid"
    nats_url: str | None = None
    nats_prefix: str = "tp"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ReferenceSettings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def get(name: str) -> str | None:
            value = env.get(PREFIX + name.upper())
            return value.strip() if value is not None and value.strip() else None

        nats_url = get("nats_url")
        if nats_url is not None and not nats_url.startswith(("nats://", "tls://")):
            raise ReferenceSettingsError(f"{PREFIX}NATS_URL must be a nats:// or tls:// URL")
        prefix = get("nats_prefix") or defaults.nats_prefix
        if not _NATS_PREFIX.fullmatch(prefix):
            raise ReferenceSettingsError(
                f"{PREFIX}NATS_PREFIX must be lower-case letters, digits and _ (max 32)"
            )
        key_file = get("event_key_file")
        return cls(
            database_url=get("database_url") or defaults.database_url,
            event_key_file=Path(key_file) if key_file else defaults.event_key_file,
            issuer=get("issuer") or defaults.issuer,
            nats_url=nats_url,
            nats_prefix=prefix,
        )
