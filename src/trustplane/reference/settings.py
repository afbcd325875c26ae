"""The reference services' own settings (not the authorization server's), from the environment:

================================================  ==========================================
``TRUSTPLANE_REFERENCE_<SERVICE>_DATABASE_URL``   the store of ``EXECUTION``, ``ALLOCATION``,
                                                  ``SETTLEMENT``, ``REPORTING`` (default: the
                                                  SQLite file beside ``DATABASE_URL``'s,
                                                  ``.trustplane/reference-<service>.db``)
``TRUSTPLANE_REFERENCE_DATABASE_URL``             the base of those defaults (SQLite: the
                                                  directory and the name they derive from,
                                                  default ``.trustplane/reference.db``; another
                                                  database: the four URLs above are required)
``TRUSTPLANE_REFERENCE_<SERVICE>_EVENT_KEY_FILE`` an owner's ES256 event key, PEM, created on
                                                  first use (default: ``EVENT_KEY_FILE``'s name
                                                  with ``-<service>``)
``TRUSTPLANE_REFERENCE_EVENT_KEY_FILE``           the base of those (default
                                                  ``.trustplane/reference-events.pem``)
``TRUSTPLANE_REFERENCE_ISSUER``                   ``iss`` of the events (default
                                                  ``https://reference.invalid``)
``TRUSTPLANE_REFERENCE_SERVICES``                 the services this process runs (hands off
                                                  and publishes their events; default all
                                                  four, comma separated)
``TRUSTPLANE_REFERENCE_NATS_URL``                 publish the outbox to JetStream (unset: only
                                                  ``GET /events``)
``TRUSTPLANE_REFERENCE_NATS_PREFIX``              subject and stream prefix (default ``tp``)
``TRUSTPLANE_REFERENCE_SSF_CONFIGURATION_URL``    the deployment's SSF transmitter,
                                                  ``{issuer}/.well-known/ssf-configuration``
                                                  (unset: no signals; docs/settlement.md)
``TRUSTPLANE_REFERENCE_SSF_CLIENT_ID``            our client there (scope ``ssf:stream`` for
                                                  ``{issuer}/ssf``, ``private_key_jwt``)
``TRUSTPLANE_REFERENCE_SSF_CLIENT_KEY_FILE``      its EC P-256 private key, PEM
``TRUSTPLANE_REFERENCE_SSF_CLIENT_KID``           its ``kid`` (default: the RFC 7638 thumbprint)
``TRUSTPLANE_REFERENCE_SSF_ALLOW_INSECURE_``      ``true``: the transmitter may be
``LOOPBACK``                                      ``http://127.0.0.1`` (development only)
================================================  ==========================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from trustplane.reference import machine

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
    ssf_configuration_url: str | None = None
    ssf_client_id: str | None = None
    ssf_client_key_file: Path | None = None
    ssf_client_kid: str | None = None
    ssf_allow_insecure_loopback: bool = False
    #: per-service overrides of the database URL and event key file (``<SERVICE>_...``)
    service_database_urls: tuple[tuple[str, str], ...] = ()
    service_event_key_files: tuple[tuple[str, Path], ...] = ()
    services: tuple[str, ...] = machine.SERVICES

    def database_url_of(self, service: str) -> str:
        """The database of ``service``'s own store (docs/settlement.md, "Stores")."""
        found = dict(self.service_database_urls).get(service)
        if found is not None:
            return found
        base = self.database_url
        if not base.startswith("sqlite"):
            raise ReferenceSettingsError(
                f"{PREFIX}{service.upper()}_DATABASE_URL is required: each service has its own "
                f"database ({PREFIX}DATABASE_URL names one only for SQLite files)"
            )
        head, _, path = base.rpartition("/")
        stem, dot, suffix = path.rpartition(".")
        name = f"{stem}-{service}.{suffix}" if dot else f"{path}-{service}"
        return f"{head}/{name}"

    def event_key_file_of(self, service: str) -> Path:
        found = dict(self.service_event_key_files).get(service)
        if found is not None:
            return found
        base = self.event_key_file
        return base.with_name(f"{base.stem}-{service}{base.suffix}")

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
        ssf_url, ssf_client, ssf_key = (
            get("ssf_configuration_url"),
            get("ssf_client_id"),
            get("ssf_client_key_file"),
        )
        if ssf_url is not None and (ssf_client is None or ssf_key is None):
            raise ReferenceSettingsError(
                f"{PREFIX}SSF_CONFIGURATION_URL needs {PREFIX}SSF_CLIENT_ID and "
                f"{PREFIX}SSF_CLIENT_KEY_FILE"
            )
        if ssf_url is not None and not ssf_url.startswith(("https://", "http://")):
            raise ReferenceSettingsError(f"{PREFIX}SSF_CONFIGURATION_URL must be an https:// URL")
        loopback = (get("ssf_allow_insecure_loopback") or "false").lower()
        if loopback not in ("true", "false", "1", "0"):
            raise ReferenceSettingsError(
                f"{PREFIX}SSF_ALLOW_INSECURE_LOOPBACK must be true or false"
            )
        urls = tuple(
            (service, url)
            for service in machine.SERVICES
            if (url := get(f"{service}_database_url")) is not None
        )
        for i, (service, url) in enumerate(urls):
            for other, same in urls[i + 1 :]:
                if same == url:
                    # one database is one set of tables: two services on it would read each
                    # other's trades as their own, and each store's indexes are its service's
                    raise ReferenceSettingsError(
                        f"{PREFIX}{service.upper()}_DATABASE_URL and {PREFIX}{other.upper()}_"
                        "DATABASE_URL name the same database: each service has its own"
                    )
        keys = tuple(
            (service, Path(key))
            for service in machine.OWNERS
            if (key := get(f"{service}_event_key_file")) is not None
        )
        served = tuple(s for s in re.split(r"[\s,]+", get("services") or "") if s)
        unknown = sorted(set(served) - set(machine.SERVICES))
        if unknown:
            raise ReferenceSettingsError(
                f"{PREFIX}SERVICES: unknown service {unknown[0]} (execution, allocation, "
                "settlement, reporting)"
            )
        return cls(
            service_database_urls=urls,
            service_event_key_files=keys,
            services=served or defaults.services,
            database_url=get("database_url") or defaults.database_url,
            event_key_file=Path(key_file) if key_file else defaults.event_key_file,
            issuer=get("issuer") or defaults.issuer,
            nats_url=nats_url,
            nats_prefix=prefix,
            ssf_configuration_url=ssf_url,
            ssf_client_id=ssf_client,
            ssf_client_key_file=Path(ssf_key) if ssf_key else None,
            ssf_client_kid=get("ssf_client_kid"),
            ssf_allow_insecure_loopback=loopback in ("true", "1"),
        )
