"""Prometheus metrics. Every refusal path increments a counter labelled by its wire error code.

With several worker processes (``trustplane serve --workers N``) the counters are kept in
prometheus_client's multiprocess mode: the supervisor gives every run a fresh directory
(``PROMETHEUS_MULTIPROC_DIR``, see :func:`prepare_multiprocess`), each worker writes its values to
memory-mapped files there, and a scrape of the operations listener's ``/metrics`` adds them up
(:func:`exposition`), whichever worker answers it. Gauges say how their per-worker values combine
(``multiprocess_mode``): a count every worker holds the same copy of is the most recent value of a
live worker, never a sum. One worker: nothing of this is used, the default registry is served.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

#: The variable prometheus_client reads (at import) to keep values in files shared by the workers.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_RUN_PREFIX = "run-"

TOKENS_ISSUED = Counter("trustplane_tokens_issued_total", "Access tokens issued", ["grant_type"])
#: per client for the issuance-spike alert: one series per registered client (bounded by the registry)
TOKENS_ISSUED_BY_CLIENT = Counter(
    "trustplane_tokens_issued_by_client_total", "Access tokens issued, by client", ["client_id"]
)
TOKEN_REFUSED = Counter("trustplane_token_refused_total", "Token requests refused", ["error"])
#: sender-constrained tokens (RFC 9449, RFC 8705): issued per binding, DPoP refusals per check
TOKENS_ISSUED_BY_BINDING = Counter(
    "trustplane_tokens_issued_by_binding_total",
    "Access tokens issued, by sender binding (none, dpop, mtls, dpop+mtls)",
    ["binding"],
)
TOKEN_BINDING_REFUSED = Counter(
    "trustplane_token_binding_refused_total",
    "Token requests refused for their DPoP proof, by reason (dpop_htu, dpop_replay, ...)",
    ["reason"],
)
INTROSPECTIONS = Counter("trustplane_introspections_total", "Introspection answers", ["active"])
REVOCATIONS = Counter("trustplane_revocations_total", "Revocation requests", ["outcome"])
REGISTRATIONS = Counter(
    "trustplane_registrations_total", "Registration endpoint outcomes", ["outcome"]
)
PROTOCOL_ERRORS = Counter(
    "trustplane_protocol_errors_total", "Error responses", ["endpoint", "error"]
)
WRITER_BATCH = Histogram(
    "trustplane_group_commit_batch_size",
    "Writes per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
BEARER_REFUSED = Counter(
    "trustplane_bearer_refused_total",
    "Requests to our bearer-protected APIs refused by the bearer guard",
    ["api", "error", "reason"],
)
CACHE_RELOADS = Counter("trustplane_cache_reloads_total", "In-memory cache reloads", ["cache"])
ACTIVE_CLIENTS = Gauge(
    "trustplane_clients",
    "Registered clients in the in-memory registry",
    multiprocess_mode="livemostrecent",
)
CERTIFICATE_CLIENT_AUTH = Counter(
    "trustplane_certificate_client_auth_total",
    "RFC 8705 client authentications by method and outcome "
    "(authenticated, no_certificate, chain, subject, key)",
    ["method", "outcome"],
)
TOKEN_RIGHTS_REFUSED = Counter(
    "trustplane_token_rights_refused_total",
    "Requests refused a right over a token issued to another client (exchange, introspection)",
    ["endpoint", "reason"],
)
TOKEN_EXCHANGES = Counter(
    "trustplane_token_exchanges_total",
    "RFC 8693 token exchanges that issued a token, by subject token type and mode",
    ["subject_token_type", "mode"],
)
EXCHANGE_CHAIN_DEPTH = Histogram(
    "trustplane_token_exchange_actor_chain_depth",
    "Actors in the delegation chain (act claims) of the tokens token exchange issued",
    buckets=(0, 1, 2, 3, 4, 5, 8),
)
PARTNER_ASSERTIONS = Counter(
    "trustplane_partner_assertions_total",
    "Partner-signed JWTs verified or refused, by partner and reason",
    ["partner", "outcome"],
)
PARTNERS = Gauge(
    "trustplane_partners",
    "Partners in the in-memory trust registry",
    multiprocess_mode="livemostrecent",
)
AUTHORIZATIONS = Counter(
    "trustplane_authorizations_total", "Authorization endpoint outcomes", ["outcome"]
)
LOGINS = Counter(
    "trustplane_logins_total", "Login attempts at the authorization endpoint", ["outcome"]
)
MANDATE_CHECKS = Counter(
    "trustplane_mandate_checks_total",
    "Mandate usability checks (code redemption, refresh, introspection) by outcome",
    ["outcome"],
)
MANDATE_CHANGES = Counter("trustplane_mandate_changes_total", "Mandate changes", ["action"])
SECURITY_EVENTS = Counter(
    "trustplane_security_events_total", "Security events stored and published", ["outcome"]
)

# policy decision point
POLICY_DECISIONS = Counter("trustplane_policy_decisions_total", "Policy decisions", ["decision"])
POLICY_FAIL_CLOSED = Counter(
    "trustplane_policy_fail_closed_total", "Denies forced by an error (fail closed)", ["reason"]
)
POLICY_CACHE = Counter(
    "trustplane_policy_token_cache_total", "Token-endpoint decision cache lookups", ["result"]
)


# --------------------------------------------------------------------------- several workers


def prepare_multiprocess(data_dir: Path) -> tuple[Path, bool]:
    """Before the workers are spawned: the directory their metric files go to, empty, exported as
    ``PROMETHEUS_MULTIPROC_DIR`` (the spawned workers inherit it). An operator's own directory (the
    variable already set) is emptied of metric files; otherwise a fresh ``metrics/run-PID`` under the
    data directory is made, and the directories of runs whose supervisor is gone are removed.
    Returns (directory, whether this run owns it and removes it at exit: :func:`finish_multiprocess`).
    """
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    base = data_dir / "metrics"
    base.mkdir(parents=True, exist_ok=True)
    for old in base.glob(f"{_RUN_PREFIX}*"):
        if not _alive(old.name.removeprefix(_RUN_PREFIX)):
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"{_RUN_PREFIX}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    os.environ[MULTIPROC_ENV] = str(path)
    return path, True


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours to clean up
        return True
    return True


def worker_exited(pid: int, path: Path) -> None:
    """A worker is gone (exited, killed, replaced): its ``live*`` gauge values stop counting."""
    mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def finish_multiprocess(path: Path, owned: bool) -> None:
    if owned:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(KeyError):
            del os.environ[MULTIPROC_ENV]


@functools.cache
def _multiprocess_registry(path: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    return registry


def exposition() -> bytes:
    """The text a ``/metrics`` scrape answers: the sum over every worker of this run when metrics
    are kept in multiprocess mode, else this process's default registry."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        return generate_latest(_multiprocess_registry(path))
    return generate_latest()


CONTENT_TYPE = CONTENT_TYPE_LATEST
