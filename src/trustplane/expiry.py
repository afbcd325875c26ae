"""What expires soon and how far the ledger lags, as gauges for the alert rules (``deploy/prometheus``).

Set by the maintenance task (every minute, :meth:`trustplane.services.Services.maintenance`), never on a
request. Expiries are Unix timestamps, not "seconds left": a timestamp stays right between updates,
and the rule computes ``value - time()`` at evaluation (the node exporter's and blackbox exporter's
convention, e.g. ``probe_ssl_earliest_cert_expiry``). A kind with nothing that expires is ``+Inf``.

* ``signing_key``: when the active signing key is due for rotation (activated + rotation interval);
  a key past it means scheduled rotation is not happening.
* ``client_certificate`` / ``partner_certificate``: the earliest ``notAfter`` of the X.509
  certificates (``x5c``) in registered clients' and partners' key sets.
* ``mandate``: the earliest ``effective_until`` of an active or suspended mandate.

``trustplane_audit_pending_entries``: appended entries not yet integrated into the ledger's tree.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cryptography import x509
from prometheus_client import Gauge
from sqlalchemy import func, select

from trustplane.audit import store as audit_store
from trustplane.keys.store import KeyState
from trustplane.mandates.model import MandateStatus
from trustplane.mandates.tables import mandates

if TYPE_CHECKING:
    from trustplane.services import Services

EARLIEST_EXPIRY = Gauge(
    "trustplane_earliest_expiry_timestamp_seconds",
    "Earliest expiry (Unix time) of what trustplane holds, by kind; +Inf when nothing expires",
    ["kind"],
    multiprocess_mode="livemostrecent",
)
AUDIT_PENDING = Gauge(
    "trustplane_audit_pending_entries",
    "Audit entries appended but not yet integrated into the ledger's tree",
    multiprocess_mode="livemostrecent",
)
KINDS = ("signing_key", "client_certificate", "partner_certificate", "mandate")


async def observe(svc: Services) -> None:
    """Recompute every gauge of this module (a few indexed reads)."""
    earliest = {
        "signing_key": await _signing_key(svc),
        "client_certificate": _earliest_cert(
            c.metadata.get("jwks") for c in await svc.clients.list()
        ),
        "partner_certificate": _earliest_cert(
            p.document.get("keys", {}).get("jwks") for p in await svc.federation.current()
        ),
        "mandate": await _mandate(svc),
    }
    for kind, when in earliest.items():
        EARLIEST_EXPIRY.labels(kind=kind).set(math.inf if when is None else when)
    async with svc.db.read() as conn:
        AUDIT_PENDING.set(await audit_store.count_pending(conn))


async def _signing_key(svc: Services) -> int | None:
    interval = svc.settings.key_rotation_interval
    active = [k for k in await svc.keys.list_all() if k.state is KeyState.ACTIVE]
    if interval == 0 or not active or active[0].activated_at is None:
        return None
    return active[0].activated_at + interval


async def _mandate(svc: Services) -> int | None:
    live = (MandateStatus.ACTIVE.value, MandateStatus.SUSPENDED.value)
    query = select(func.min(mandates.c.effective_until)).where(mandates.c.status.in_(live))
    async with svc.db.read() as conn:
        value = (await conn.execute(query)).scalar()
    return int(value) if value is not None else None


def _earliest_cert(jwks_sets: Iterable[Any]) -> int | None:
    """The earliest ``notAfter`` of the leaf certificate (``x5c[0]``) of every key; keys without a
    certificate, and certificates that do not parse, do not count (registration validated them)."""
    found: list[int] = []
    for jwks in jwks_sets:
        keys = jwks.get("keys", []) if isinstance(jwks, dict) else []
        for key in keys:
            chain = key.get("x5c") if isinstance(key, dict) else None
            if isinstance(chain, list) and chain and isinstance(chain[0], str):
                try:
                    cert = x509.load_der_x509_certificate(base64.b64decode(chain[0]))
                except ValueError:
                    continue
                found.append(int(cert.not_valid_after_utc.timestamp()))
    return min(found, default=None)
