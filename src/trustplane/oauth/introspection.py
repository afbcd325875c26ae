"""Token introspection (RFC 7662) and revocation (RFC 7009) of our JWT access tokens.

Introspection callers authenticate like any client (RFC 7662 §2.1: the endpoint MUST require
authorization). A caller may see a token issued to itself, or a token whose audience it is the
resource server for (``resource_server_for``, granted by the operator only: a client can never give
itself the right to read other parties' tokens by writing it in its registration). Anything else,
and anything not currently valid, is ``{"active": false}`` and nothing more (RFC 7662 §2.2: "the
protected resource is not allowed to introspect this particular token"), so introspection cannot be
used to probe other parties' tokens; such a refusal of a live token is counted in
``trustplane_token_rights_refused_total{endpoint="introspection"}``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509

from trustplane import metrics
from trustplane.audit.sink import AuditSink, write_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.clients.authentication import ClientAuthenticator
from trustplane.clients.service import ClientRegistry
from trustplane.errors import UnauthorizedClientError
from trustplane.keys.service import KeyService
from trustplane.oauth.exchange.verified import VerifiedOwnTokens
from trustplane.protocol.form import Form
from trustplane.protocol.revocations import RevocationStore
from trustplane.protocol.tokens import VerifiedClaims, read_access_token
from trustplane.settings import Settings
from trustplane.storage.db import Database

if TYPE_CHECKING:
    from trustplane.mandates.service import MandateService

INACTIVE: dict[str, Any] = {"active": False}


class RefreshRevoker(Protocol):
    async def revoke(self, token: str, client_id: str) -> bool:
        """True if ``token`` was a refresh token of ``client_id`` and is now revoked."""
        ...


EXPOSED_CLAIMS = (
    "scope",
    "client_id",
    "sub",
    "aud",
    "iss",
    "exp",
    "iat",
    "nbf",
    "jti",
    "lei",
    "act",
    "mandate",
    "authorization_details",
)
#: Federated tokens (jwt-bearer): where the subject came from, unflattened.
FEDERATION_CLAIMS = ("origin", "partner", "txn")


class IntrospectionService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        authenticator: ClientAuthenticator,
        keys: KeyService,
        registry: ClientRegistry,
        revocations: RevocationStore,
        audit: AuditSink,
        mandates: MandateService | None = None,
        *,
        refresh_tokens: RefreshRevoker | None = None,
    ) -> None:
        self._settings, self._db, self._auth, self._keys = settings, db, authenticator, keys
        self._registry, self._revocations, self._audit = registry, revocations, audit
        self._mandates = mandates
        #: The signature checks of tokens introspected before (a resource server commonly asks
        #: about the same token on each of its calls): only the signature is remembered, the rest
        #: of :meth:`_live_claims` runs on every request (``oauth.exchange.verified``).
        self._verified = VerifiedOwnTokens(lambda: keys.ring, settings.issuer)
        #: Revokes refresh tokens (RFC 7009 MUST; ``authorize.grants.DelegatedRevocations``).
        self._refresh_tokens = refresh_tokens

    async def introspect(
        self, form: Form, authorization: str | None, certificate: x509.Certificate | None = None
    ) -> dict[str, Any]:
        caller = (
            await self._auth.authenticate(form, authorization, certificate=certificate)
        ).client
        claims = await self._live_claims(form.require("token"))
        visible = claims is not None and (
            claims["client_id"] == caller.client_id or claims["aud"] in caller.resource_server_for
        )
        metrics.INTROSPECTIONS.labels(active=str(visible).lower()).inc()
        if not visible or claims is None:
            if claims is not None:
                metrics.TOKEN_RIGHTS_REFUSED.labels(
                    endpoint="introspection", reason="not_resource_server"
                ).inc()
            return INACTIVE
        out = {"active": True, "token_type": "Bearer"}
        out.update({k: claims[k] for k in EXPOSED_CLAIMS + FEDERATION_CLAIMS if k in claims})
        cnf = claims.get("cnf")
        if isinstance(cnf, dict):  # RFC 8705 §3.2, RFC 9449 §6.2: the binding, and DPoP's type
            out["cnf"] = cnf
            if "jkt" in cnf:
                out["token_type"] = "DPoP"
        return out

    async def revoke(
        self, form: Form, authorization: str | None, certificate: x509.Certificate | None = None
    ) -> None:
        """RFC 7009 §2.1: unknown or already-invalid tokens are a 200 no-op; another client's token is
        refused with ``unauthorized_client``. ``token_type_hint`` is only a hint and is not trusted."""
        caller = (
            await self._auth.authenticate(form, authorization, certificate=certificate)
        ).client
        token = form.require("token")
        claims = read_access_token(self._keys.ring, token, issuer=self._settings.issuer)
        if claims is None:
            refresh = self._refresh_tokens
            if refresh is not None and await refresh.revoke(token, caller.client_id):
                metrics.REVOCATIONS.labels(outcome="revoked").inc()
                return
            metrics.REVOCATIONS.labels(outcome="ignored").inc()
            return
        if claims["client_id"] != caller.client_id:
            metrics.REVOCATIONS.labels(outcome="refused").inc()
            raise UnauthorizedClientError("a client may revoke only its own tokens")
        event = AuditEvent(
            type=AuditEventType.TOKEN_REVOKED,
            issuer=self._settings.issuer,
            subject=claims["sub"],
            client_id=caller.client_id,
            audience=claims["aud"],
            jti=claims["jti"],
            payload={"exp": claims["exp"]},
        )
        async with (
            self._db.transaction() as conn
        ):  # the revocation and its audit record, atomically
            fresh = await self._revocations.revoke(
                conn, claims["jti"], caller.client_id, claims["exp"]
            )
            if fresh:
                await write_events(conn, [event])
        metrics.REVOCATIONS.labels(outcome="revoked" if fresh else "repeat").inc()

    async def _live_claims(self, token: str) -> VerifiedClaims | None:
        """Our token, valid now: signature, issuer, expiry, client active, not revoked (read from the
        database, so a revocation by any instance counts at once), mandate usable."""
        now = int(time.time())
        claims = self._verified.read(token, now)  # read_access_token, its signature remembered
        if claims is None or claims["exp"] <= now or not self._valid_yet(claims):
            return None
        client = self._registry.get(str(claims.get("client_id")))
        if client is None or not client.active:
            return None  # disabling a client ends its tokens' life at once
        async with self._db.read() as conn:
            if await self._revocations.is_revoked(conn, str(claims["jti"])):
                return None
        if not await self._mandate_usable(claims.get("mandate")):
            return None  # revoked, suspended, expired or superseded mandate: inactive at once
        return claims

    def _valid_yet(self, claims: VerifiedClaims) -> bool:
        """RFC 7662 §4: a token whose valid period has not started (``nbf``, or an ``iat``, in the
        future beyond the clock skew the bearer guard allows) is not active; a time that is not an
        integer is not one we wrote, so not active either."""
        horizon = int(time.time()) + self._settings.clock_skew
        for name in ("nbf", "iat"):
            value = claims.get(name, 0)
            if type(value) is not int or value > horizon:
                return False
        return True

    async def _mandate_usable(self, ref: Any) -> bool:
        """A token without a ``mandate`` claim rests on no mandate; one with a claim we cannot
        check (malformed, or no mandate service) fails closed."""
        if ref is None:
            return True
        if self._mandates is None or not isinstance(ref, dict):
            return False
        mandate_id, version = ref.get("id"), ref.get("version")
        if not isinstance(mandate_id, str) or not isinstance(version, int):
            return False
        return await self._mandates.is_usable(mandate_id, version)
