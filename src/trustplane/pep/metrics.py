"""Prometheus metrics of the PEP SDK. Every refusal increments a counter labelled by its reason, so a
spike of ``expired`` or ``untrusted_issuer`` shows up on a dashboard before it shows up in a ticket."""

from prometheus_client import Counter

PEP_REFUSED = Counter(
    "trustplane_pep_refused_total", "Requests refused by the PEP", ["error", "reason"]
)
PEP_ALLOWED = Counter("trustplane_pep_allowed_total", "Requests the PEP let through")
PEP_PDP_UNAVAILABLE = Counter(
    "trustplane_pep_pdp_unavailable_total",
    "Decisions that failed closed because the policy decision point could not be reached",
)
PEP_JWKS_FETCHES = Counter(
    "trustplane_pep_jwks_fetches_total", "JWKS fetches by the PEP", ["issuer", "outcome"]
)
PEP_INTROSPECTIONS = Counter(
    "trustplane_pep_introspections_total", "Revocation checks by introspection", ["outcome"]
)
PEP_IDEMPOTENCY = Counter(
    "trustplane_pep_idempotency_total",
    "Idempotency-Key outcomes: executed, replayed, released, or refused "
    "(in_progress, mismatch, missing, malformed)",
    ["outcome"],
)
#: The children the success paths increment, looked up once: ``labels()`` takes the metric's lock
#: and builds a key per call (refusals still look theirs up: their labels vary and they are rare).
IDEMPOTENCY_EXECUTED = PEP_IDEMPOTENCY.labels(outcome="executed")
IDEMPOTENCY_REPLAYED = PEP_IDEMPOTENCY.labels(outcome="replayed")
IDEMPOTENCY_RELEASED = PEP_IDEMPOTENCY.labels(outcome="released")
