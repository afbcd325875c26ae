"""Settings: environment (prefix ``TRUSTPLANE_``) over an optional TOML file over defaults.

A wrong setting raises :class:`SettingsError` carrying one line that names the setting, so the CLI can
stop start-up with that line instead of a traceback.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

SigningAlgorithm = Literal["ES256", "EdDSA", "PS256"]
#: The deployment's security profile (:mod:`trustplane.profile`, docs/fapi2.md).
Profile = Literal["default", "fapi2"]
ClientAuthMethod = Literal[
    "private_key_jwt",
    "client_secret_basic",
    "client_secret_post",
    "tls_client_auth",  # RFC 8705 §2.1 (trustplane.tls)
    "self_signed_tls_client_auth",  # RFC 8705 §2.2
]
#: The client authentication methods that need a client certificate (RFC 8705 §2).
TLS_CLIENT_AUTH_METHODS = frozenset({"tls_client_auth", "self_signed_tls_client_auth"})
#: FAPI 2.0 Security Profile §5.3.2.1: the only client authentication under ``fapi2``
#: (the profile's rules: :mod:`trustplane.profile`).
FAPI2_AUTH_METHODS = frozenset({"private_key_jwt", *TLS_CLIENT_AUTH_METHODS})

#: RFC 9068 tokens are short-lived receipts: nobody may configure a lifetime above this.
MAX_ACCESS_TOKEN_LIFETIME = 900
#: draft-ietf-oauth-rfc7523bis: a client assertion may be valid for at most this long.
MAX_ASSERTION_LIFETIME = 300
#: RFC 9126 §2.2 leaves the ``request_uri`` lifetime to the server; trustplane never goes beyond this.
MAX_PAR_LIFETIME = 600
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


#: The database URL schemes trustplane has drivers for (plain ones get the async driver).
DATABASE_SCHEMES = frozenset(
    {"sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg"}
)


class SettingsError(Exception):
    """A setting is wrong; ``str(self)`` is one line meant for the operator.

    ``setting`` is the field name (``port``) when one setting is to blame, so that a command line
    that set it with an option can name the option instead of the variable.
    """

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


def decode_kek(text: str) -> bytes:
    """The key-encryption key from its setting: 32 bytes, base64url (``trustplane.keys.crypto`` uses
    it; it is parsed here so that a bad value fails when the settings load)."""
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("must be 32 bytes, base64url-encoded") from None
    if len(raw) != 32:
        raise ValueError("must be 32 bytes, base64url-encoded")
    return raw


def is_loopback_host(host: str | None) -> bool:
    return host is not None and (host in LOOPBACK_HOSTS or host.startswith("127."))


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the file named by ``TRUSTPLANE_CONFIG`` (if any); keys are the setting names."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                self._data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SettingsError(
                    f"invalid setting TRUSTPLANE_CONFIG: cannot read config file {path}: {exc}"
                ) from exc
            unknown = set(self._data) - set(settings_cls.model_fields)
            if unknown:
                raise SettingsError(
                    f"invalid setting TRUSTPLANE_CONFIG: config file {path}: "
                    f"unknown setting(s) {', '.join(sorted(unknown))}"
                )

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    """Every knob of a trustplane deployment. See README "Configuration" for the table."""

    model_config = SettingsConfigDict(env_prefix="TRUSTPLANE_", extra="forbid", frozen=True)

    issuer: str = Field(default="", description="Defaults to http://HOST:PORT (loopback only)")
    #: ``default`` or ``fapi2`` (FAPI 2.0 Security Profile, docs/fapi2.md); a client can opt into
    #: fapi2 on a default deployment, never out of it on a fapi2 one (:mod:`trustplane.profile`).
    profile: Profile = "default"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    #: Seconds an idle HTTP/1.1 keep-alive connection stays open. Longer than every client's idle
    #: expiry (our outbound clients: 2 s; HAProxy's ``timeout http-keep-alive``, a cloud load
    #: balancer's idle timeout, often 60 s): the client must close first, or a request sent as the
    #: server closes meets a reset connection.
    keep_alive: int = Field(default=75, ge=1, le=3600)
    #: The operations listener (/metrics, /readyz, /healthz, /openapi.json, /docs); port 0 disables it.
    ops_host: str = "127.0.0.1"
    ops_port: int = Field(default=9464, ge=0, le=65535)
    data_dir: Path = Path(".trustplane")
    database_url: str = ""
    redis_url: str = ""

    access_token_lifetime: int = Field(default=300, ge=30, le=MAX_ACCESS_TOKEN_LIFETIME)
    # --- Transaction Tokens (draft-ietf-oauth-transaction-tokens-10, docs/token_exchange.md)
    #: Lifetime of a Txn-Token in seconds (short: it lives for one call chain).
    txn_token_lifetime: int = Field(default=60, ge=5, le=300)
    #: The Txn-Token ``aud``: this deployment's trust domain (default: the issuer).
    trust_domain: str = Field(default="", max_length=2000)
    clock_skew: int = Field(default=60, ge=0, le=300)
    signing_algorithm: SigningAlgorithm = "ES256"
    allowed_signing_algorithms: tuple[SigningAlgorithm, ...] = ("ES256", "EdDSA", "PS256")
    client_auth_methods: tuple[ClientAuthMethod, ...] = ("private_key_jwt",)

    key_encryption_key: SecretStr | None = None
    key_rotation_interval: int = Field(default=90 * 86400, ge=0)
    key_next_publication: int = Field(default=86400, ge=0)

    scopes_file: Path | None = None
    cache_refresh_interval: float = Field(default=1.0, gt=0, le=60)
    initial_access_token_lifetime: int = Field(default=86400, ge=60)
    allow_insecure_loopback_jwks_uri: bool = False
    #: Seconds a client's or partner's ``jwks_uri`` keys stay usable after their last good fetch
    #: while every refetch fails (the key server down); then none (clients/remote_jwks.py).
    jwks_max_stale: float = Field(default=86400.0, ge=0, le=30 * 86400)

    # --- federation: partner trust registry and the jwt-bearer grant (trustplane.federation)
    #: Hosts a partner's ``jwks_uri`` may point at (https only); nothing else is ever fetched.
    federation_jwks_hosts: tuple[str, ...] = ()
    federation_jwks_ttl: float = Field(default=300.0, gt=0, le=86400)
    #: An unknown ``kid`` refetches a partner's JWKS at most once per this many seconds.
    federation_jwks_min_refetch: float = Field(default=60.0, ge=0, le=3600)
    #: Development and tests only: accept http partner issuers and jwks_uris on loopback hosts.
    federation_allow_insecure_loopback: bool = False
    # --- shared signals (trustplane.ssf): the SSF 1.0 transmitter and receiver (docs/ssf.md)
    #: How often the push deliverer looks for due SETs (a revocation in this process wakes it).
    ssf_push_interval: float = Field(default=0.25, gt=0, le=60)
    #: Exponential backoff of a failed push: first retry after this, doubling up to ``ssf_retry_max``.
    ssf_retry_base: float = Field(default=1.0, gt=0, le=3600)
    ssf_retry_max: float = Field(default=300.0, gt=0, le=86400)
    #: RFC 8936 long poll: how long a poll without ``returnImmediately`` waits for a SET.
    ssf_poll_wait: float = Field(default=5.0, ge=0, le=60)
    #: Development and tests only: push to http receivers on loopback hosts.
    ssf_allow_insecure_loopback: bool = False
    #: How often the receiver retries subscribing to partners' transmitters that failed.
    ssf_subscribe_interval: float = Field(default=60.0, gt=0, le=86400)
    # --- outbound requests (trustplane.outbound): the guarded fetcher every fetch of ours goes through
    outbound_connect_timeout: float = Field(default=3.0, gt=0, le=60)
    outbound_read_timeout: float = Field(default=5.0, gt=0, le=120)
    #: The whole request, body included: a server trickling bytes cannot hold a fetch open longer.
    outbound_total_timeout: float = Field(default=10.0, gt=0, le=300)
    #: Requests per second per host (token bucket); 0 disables the limit.
    outbound_rate_per_host: float = Field(default=2.0, ge=0, le=1000)
    outbound_burst_per_host: int = Field(default=10, ge=1, le=10_000)
    # authorization endpoint, login and consent, codes, refresh tokens (issue 5)
    authorization_code_lifetime: int = Field(default=60, ge=5, le=60)
    refresh_token_lifetime: int = Field(default=8 * 3600, ge=300, le=30 * 86400)
    session_lifetime: int = Field(default=3600, ge=60, le=86400)
    login_max_failures: int = Field(default=5, ge=1, le=100)
    login_lockout: int = Field(default=60, ge=1, le=3600)
    #: Who runs this service, named on every page a person sees (login, consent, errors, ``/``);
    #: empty: the issuer's host name.
    operator_name: str = Field(default="", max_length=200)
    # --- pushed authorization requests (RFC 9126) and request objects (RFC 9101), issue 13
    #: How long a ``request_uri`` from ``/par`` stays usable (RFC 9126 §2.2; never over 600 s).
    par_lifetime: int = Field(default=60, ge=5, le=MAX_PAR_LIFETIME)
    #: Every client must push its authorization requests (RFC 9126 §5); a client can also be made
    #: to by its own registration (``require_pushed_authorization_requests``).
    require_pushed_authorization_requests: bool = False
    #: Every authorization request must come as a signed request object (RFC 9101 §10.5); a client
    #: can also be made to by its own registration (``require_signed_request_object``).
    require_signed_request_object: bool = False

    # --- operator console at /console (docs/console.md); off unless console_lei is set
    #: LEI of the operator's legal entity, which owns the console's built-in client.
    console_lei: str = Field(default="", max_length=20)
    #: username -> console roles ("operator", "compliance", "auditor"): who may use the console.
    console_roles: dict[str, tuple[Literal["operator", "compliance", "auditor"], ...]] = Field(
        default_factory=dict
    )

    # mandates, RAR authorization_details types, security events (issue 5, mandates)
    authorization_details_types_dir: Path | None = None
    mandate_default_lifetime: int = Field(default=90 * 86400, ge=3600, le=5 * 366 * 86400)
    mandate_cache_size: int = Field(default=100_000, ge=0, le=10_000_000)
    nats_url: str = Field(default="", pattern=r"^((nats|tls|ws|wss)://\S+)?$")
    nats_stream: str = Field(default="TRUSTPLANE_SECURITY_EVENTS", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    nats_subject: str = Field(
        default="trustplane.security_events", pattern=r"^[A-Za-z0-9_.-]{1,128}$"
    )
    security_event_audience: tuple[str, ...] = ()
    # the authorization server's own signed security events (GET /events, JetStream: docs/events.md)
    events_nats_url: str = Field(default="", pattern=r"^((nats|tls|ws|wss)://\S+)?$")
    events_subject_prefix: str = Field(default="tp", pattern=r"^[a-z0-9_-]{1,32}$")
    events_publish_batch: int = Field(default=100, ge=1, le=10_000)

    # --- request limits (trustplane.limits, docs/operations.md)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=64 << 20)
    max_authzen_body_bytes: int = Field(default=256 * 1024, ge=1024, le=64 << 20)
    max_policy_body_bytes: int = Field(default=4 << 20, ge=1024, le=256 << 20)
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1 << 20)
    max_header_count: int = Field(default=100, ge=16, le=1000)

    # --- TLS and mutual TLS (trustplane.tls, docs/operations.md "TLS and proxy mode")
    #: PEM certificate chain and key of the public listener; both set: ``serve`` speaks HTTPS only.
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    #: PEM bundle of the CAs that issue client certificates: the handshake asks for a certificate
    #: (optional) and verifies it against these; ``tls_client_auth`` validates chains against them.
    tls_client_ca: Path | None = None
    #: Behind a TLS-terminating proxy: the header carrying the client certificate (URL-encoded PEM,
    #: nginx ``$ssl_client_escaped_cert``, or RFC 9440 ``:base64:``), honoured only from
    #: ``trusted_proxies`` (CIDRs); from any other peer it is ignored and counted.
    tls_client_cert_header: str = Field(default="", pattern=r"^([A-Za-z0-9-]{1,64})?$")
    trusted_proxies: tuple[str, ...] = ()
    #: RFC 8705 §5 ``mtls_endpoint_aliases`` base URL (a host where the proxy asks for certificates);
    #: empty: the issuer.
    mtls_base_url: str = ""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    #: OpenTelemetry traces (trustplane.tracing): the OTLP/HTTP collector's base URL; empty: the
    #: standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables, else tracing is off.
    otel_exporter_otlp_endpoint: str = Field(default="", pattern=r"^(https?://[^\s/?#]+[^\s?#]*)?$")

    # --- audit ledger (docs/ledger.md) ---
    audit_log_origin: str = Field(
        default="",
        description="Checkpoint origin = log key name; default: issuer host/path + /audit",
    )
    audit_integrate_interval: float = Field(default=0.2, gt=0, le=10)
    audit_integrate_batch: int = Field(default=2048, ge=1, le=50_000)
    #: MiB of the lower tree levels' hashes each process keeps for proofs (docs/ledger.md).
    audit_proof_cache_mb: int = Field(default=128, ge=0, le=65_536)
    audit_retention_days: dict[str, int] = Field(
        default_factory=dict,
        description='Event type (or "*" for the rest) -> days a payload is kept',
    )

    # --- surveillance signals over the ledger (trustplane.surveillance, docs/surveillance.md)
    surveillance_enabled: bool = True
    #: Seconds between the detector's rounds (each reads what the ledger integrated since).
    surveillance_interval: float = Field(default=1.0, gt=0, le=300)
    #: Most ledger entries one round reads (one transaction; on SQLite it holds the write lock);
    #: unset: 2,000 on SQLite, 5,000 on PostgreSQL (trustplane.surveillance.service).
    surveillance_batch: int | None = Field(default=None, ge=1, le=50_000)
    #: Exchanges of a client before a new (subject, actor) pair or a deeper chain alerts.
    surveillance_delegation_learning: int = Field(default=10, ge=0, le=1_000_000)
    #: An ``act`` chain longer than this alerts whatever the client's history (0: no limit).
    surveillance_max_chain_depth: int = Field(default=3, ge=0, le=64)
    #: A partner's assertions refused for a claim requirement this often in one window alert.
    surveillance_claim_failures: int = Field(default=5, ge=1, le=1_000_000)
    surveillance_claim_failure_window: int = Field(default=600, ge=10, le=7 * 86400)
    surveillance_claim_failure_reasons: tuple[str, ...] = Field(
        default=(
            "missing_claim",
            "claim_value",
            "product_not_allowed",
            "region_not_allowed",
            "transaction",
        ),
        min_length=1,
    )
    #: A client issued more than max(floor, factor x baseline) tokens in one window alerts; the
    #: baseline is its mean per window over the ``baseline_windows`` windows before.
    surveillance_issuance_window: int = Field(default=300, ge=10, le=86400)
    surveillance_issuance_floor: int = Field(default=100, ge=1, le=100_000_000)
    surveillance_issuance_factor: float = Field(default=5.0, ge=1.0, le=1000.0)
    surveillance_issuance_baseline_windows: int = Field(default=12, ge=1, le=10_000)

    @field_validator("audit_log_origin")
    @classmethod
    def _origin_is_a_key_name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[^\s+]+", value):
            raise ValueError("must be non-empty without spaces or '+' (it names the log's key)")
        return value

    @field_validator("audit_retention_days")
    @classmethod
    def _retention_keys_are_types(cls, value: dict[str, int]) -> dict[str, int]:
        for key, days in value.items():
            if key != "*" and not re.fullmatch(r"[a-z][a-z0-9_]*(:[a-z][a-z0-9_]*){2}", key):
                raise ValueError(f"{key!r} is not an event type (component:subject:action) or '*'")
            if days < 1:
                raise ValueError(f"{key!r}: a retention period is at least 1 day")
        return value

    @property
    def audit_origin(self) -> str:
        """The log's origin line and key name (C2SP: a schema-less URL identifying the log)."""
        if self.audit_log_origin:
            return self.audit_log_origin
        parts = urlsplit(self.issuer)
        return f"{parts.netloc}{parts.path}/audit"

    # --- DPoP, RFC 9449 (trustplane.dpop, docs/sender_constrained.md)
    #: Every DPoP proof must carry a nonce of this deployment (``use_dpop_nonce`` otherwise).
    dpop_nonce_required: bool = False
    #: Seconds per nonce window; a nonce is accepted for one to two windows.
    dpop_nonce_lifetime: int = Field(default=300, ge=10, le=3600)
    #: The accepted ``iat`` window of a proof: this many seconds in the past ...
    dpop_proof_max_age: int = Field(default=60, ge=5, le=300)
    #: ... and this many ahead (clock offset; FAPI 2.0 accepts up to 10 s, refuses over 60 s).
    dpop_proof_max_ahead: int = Field(default=10, ge=0, le=60)

    # --- policy decision point (trustplane.policy)
    policy_served_regions: tuple[str, ...] = Field(
        default=("eu",), min_length=1, description="Data regions this deployment serves"
    )
    policy_token_enforcement: bool = True
    policy_simulation_max_records: int = Field(default=5_000_000, ge=1)
    policy_decision_retention_days: int = Field(default=90, ge=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config = os.environ.get("TRUSTPLANE_CONFIG")
        toml = _TomlSource(settings_cls, Path(config) if config else None)
        return (init_settings, env_settings, toml)

    @model_validator(mode="before")
    @classmethod
    def _default_issuer(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("issuer"):
            host = data.get("host", "127.0.0.1")
            scheme = "https" if data.get("tls_certificate") else "http"
            data = {
                **data,
                "issuer": f"{scheme}://{'[' + host + ']' if ':' in host else host}:{data.get('port', 8000)}",
            }
        return data

    @field_validator("issuer")
    @classmethod
    def _issuer_is_https_url(cls, value: str) -> str:
        """RFC 8414 §2: https, no query, no fragment. Plain http only on a loopback host."""
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise ValueError("must be an absolute URL") from None
        if parts.query or parts.fragment or not parts.hostname:
            raise ValueError("must be an absolute URL without query or fragment")
        if parts.scheme != "https" and not (
            parts.scheme == "http" and is_loopback_host(parts.hostname)
        ):
            raise ValueError("must use https (plain http is allowed only on a loopback host)")
        if value.endswith("/"):
            raise ValueError("must not end with '/'")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_is_supported(cls, value: str) -> str:
        """Refuse what SQLAlchemy cannot parse or has no installed driver for, before any connect.
        The message never repeats the URL: it may hold a password."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if not value:
            return value
        try:
            scheme = make_url(value).drivername
        except (ArgumentError, ValueError):
            raise ValueError(
                "not a database URL: use postgresql://USER@HOST:PORT/NAME or sqlite:///PATH"
            ) from None
        if scheme not in DATABASE_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme!r}: use postgresql://USER@HOST:PORT/NAME or "
                "sqlite:///PATH"
            )
        return value

    @field_validator("key_encryption_key")
    @classmethod
    def _kek_is_32_bytes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            decode_kek(value.get_secret_value())
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a network (CIDR, e.g. 10.0.0.0/24)") from None
        return value

    @field_validator("tls_certificate", "tls_key", "tls_client_ca")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("mtls_base_url")
    @classmethod
    def _mtls_base_is_https(cls, value: str) -> str:
        if value and (urlsplit(value).scheme != "https" or value.endswith("/")):
            raise ValueError("must be an https URL without a trailing '/'")
        return value

    @field_validator("ops_port", mode="before")
    @classmethod
    def _empty_ops_port_disables(cls, value: Any) -> Any:
        return 0 if value in ("", None) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.ops_port and self.ops_port == self.port:
            raise ValueError("ops_port: must differ from TRUSTPLANE_PORT (0 disables it)")
        if self.signing_algorithm not in self.allowed_signing_algorithms:
            raise ValueError("signing_algorithm: must be one of allowed_signing_algorithms")
        if not self.client_auth_methods:
            raise ValueError("client_auth_methods: must not be empty")
        self._consistent_tls()
        self._consistent_profile()
        return self

    def _consistent_profile(self) -> None:
        """``profile = "fapi2"`` refuses settings that would break the FAPI 2.0 Security Profile
        rather than quietly overriding them (docs/fapi2.md)."""
        if self.profile != "fapi2":
            return
        loose = sorted(set(self.client_auth_methods) - FAPI2_AUTH_METHODS)
        if loose:
            raise ValueError(
                f"client_auth_methods: {', '.join(loose)} is not allowed under profile fapi2 "
                "(FAPI 2.0 Security Profile §5.3.2.1: private_key_jwt or mutual TLS only)"
            )
        if not 10 <= self.clock_skew <= 60:
            raise ValueError(
                "clock_skew: must be 10..60 under profile fapi2 (FAPI 2.0 Security Profile "
                "§5.3.2.1: iat/nbf up to 10 s ahead accepted, over 60 s refused)"
            )

    @property
    def par_required(self) -> bool:
        """RFC 9126 §5 deployment-wide: set, or forced by the fapi2 profile (§5.3.2.2)."""
        return self.require_pushed_authorization_requests or self.profile == "fapi2"

    def _consistent_tls(self) -> None:
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError("tls_certificate: tls_certificate and tls_key go together")
        if self.tls_client_ca is not None and self.tls_certificate is None and not self.proxy_mode:
            raise ValueError("tls_client_ca: needs tls_certificate or tls_client_cert_header")
        if bool(self.tls_client_cert_header) != bool(self.trusted_proxies):
            raise ValueError(
                "trusted_proxies: tls_client_cert_header and trusted_proxies go together"
            )
        mtls = TLS_CLIENT_AUTH_METHODS.intersection(self.client_auth_methods)
        if mtls and not self.mtls_enabled:
            raise ValueError(
                f"client_auth_methods: {', '.join(sorted(mtls))} needs client certificates: set "
                "tls_certificate with tls_client_ca, or tls_client_cert_header with trusted_proxies"
            )
        if "tls_client_auth" in self.client_auth_methods and self.tls_client_ca is None:
            raise ValueError("client_auth_methods: tls_client_auth needs tls_client_ca")

    @property
    def tls_enabled(self) -> bool:
        """``serve`` terminates TLS itself."""
        return self.tls_certificate is not None

    @property
    def proxy_mode(self) -> bool:
        """Client certificates arrive from a trusted TLS-terminating proxy in a header."""
        return bool(self.tls_client_cert_header and self.trusted_proxies)

    @property
    def mtls_enabled(self) -> bool:
        """Client certificates can reach the application (RFC 8705 client auth and binding)."""
        return self.proxy_mode or (self.tls_enabled and self.tls_client_ca is not None)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'trustplane.db'}"

    @property
    def is_embedded(self) -> bool:
        return self.effective_database_url.startswith("sqlite")


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning every validation failure into one :class:`SettingsError` line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        # The default issuer is derived from host and port: blame a bad port, not the issuer.
        first = sorted(exc.errors(), key=lambda e: e["loc"][:1] == ("issuer",))[0]
        name, message = ".".join(str(p) for p in first["loc"]), str(first["msg"])
        if not name:  # a cross-field rule: its message starts with "field: "
            name, _, message = message.removeprefix("Value error, ").partition(": ")
        field = name.split(".")[0]
        raise SettingsError(
            f"invalid setting TRUSTPLANE_{field.upper()}: {message}", field
        ) from None
    except PydanticSettingsError as exc:  # an environment value for a list setting is not JSON
        found = re.search(r'field "(\w+)"', str(exc))
        env = f"TRUSTPLANE_{found.group(1).upper()}" if found else "TRUSTPLANE_*"
        raise SettingsError(
            f"invalid setting {env}: must be a JSON array of strings", found and found.group(1)
        ) from None
