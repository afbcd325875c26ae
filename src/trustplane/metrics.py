"""Prometheus metrics. Every refusal path increments a counter labelled by its wire error code."""

from prometheus_client import Counter, Gauge, Histogram

TOKENS_ISSUED = Counter("trustplane_tokens_issued_total", "Access tokens issued", ["grant_type"])
TOKEN_REFUSED = Counter("trustplane_token_refused_total", "Token requests refused", ["error"])
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
ACTIVE_CLIENTS = Gauge("trustplane_clients", "Registered clients in the in-memory registry")
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
PARTNER_ASSERTIONS = Counter(
    "trustplane_partner_assertions_total",
    "Partner-signed JWTs verified or refused, by partner and reason",
    ["partner", "outcome"],
)
PARTNERS = Gauge("trustplane_partners", "Partners in the in-memory trust registry")
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
