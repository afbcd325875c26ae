"""The token endpoint (RFC 6749 §3.2): authenticate the client, dispatch on ``grant_type``, issue.

Every outcome is an audit event, durable before the response: ``oauth:token:issued`` with the token's
jti, audience and scopes, or ``oauth:token:refused`` with the wire error and the log-only reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from trustplane import metrics
from trustplane.audit.sink import AuditSink
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.clients.authentication import AuthenticatedClient, ClientAuthenticator
from trustplane.clients.model import Client
from trustplane.clients.resources import select_resource, select_scopes
from trustplane.errors import (
    InvalidAuthorizationDetailsError,
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    OAuth2Error,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from trustplane.keys.service import KeyService
from trustplane.oauth.outcomes import Outcome, OutcomeRecorder, Recorded
from trustplane.policy.enforcement import ScopeDenied, TokenPolicy
from trustplane.policy.recorder import DecisionRecord
from trustplane.protocol.form import Form
from trustplane.protocol.replay import ReplayUse
from trustplane.protocol.scopes import Vocabulary
from trustplane.protocol.tokens import IssuedToken, issue_access_token
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings


@dataclass(frozen=True, slots=True)
class Grant:
    """What a grant handler decided: the token to return. ``pending_use`` is the grant's own
    single-use assertion (a partner's JWT-bearer assertion) still to consume together with the
    outcome; if it turns out to be a replay, ``replay_error`` is raised instead. ``response``: extra
    response members (RFC 6749 §5.1 ``refresh_token``, RFC 9396 §7 ``authorization_details``);
    ``mandate`` and ``details_digest``: what the audit record names. ``decisions``: the policy
    decisions that allowed it (recorded in the same transaction as the issuance)."""

    token: IssuedToken
    pending_use: ReplayUse | None = None
    replay_error: OAuth2Error | None = None
    response: dict[str, Any] = field(default_factory=dict)
    mandate: tuple[str, int] | None = None
    details_digest: str | None = None
    decisions: tuple[DecisionRecord, ...] = ()
    #: RFC 8693 token exchange: the ``act`` chain (outermost first) and what the issue record names
    #: beyond the envelope (the subject token's issuer and jti, the token types).
    actor_chain: tuple[str, ...] = ()
    audit: dict[str, Any] = field(default_factory=dict)
    #: jtis of our own tokens the grant rests on: checked against revocations in the outcome's
    #: transaction; ``revoked_error`` is raised (and recorded) if one is revoked.
    unrevoked: tuple[str, ...] = ()
    revoked_error: OAuth2Error | None = None


def replayed() -> InvalidClientError:
    """RFC 7523 §3 item 7: the assertion's jti was used before."""
    return InvalidClientError("client assertion was already used", debug="jti replay")


GrantHandler = Callable[[Form, AuthenticatedClient], Awaitable[Grant]]
#: ``TokenEndpoint.authorize_scopes``: the PDP check every grant makes once it knows the audience and
#: scopes, before it consumes anything single-use (a code, a refresh token, a partner assertion).
ScopeCheck = Callable[[Client, tuple[str, ...], str, str], tuple[DecisionRecord, ...]]


class TokenEndpoint:
    def __init__(
        self,
        settings: Settings,
        authenticator: ClientAuthenticator,
        keys: KeyService,
        vocabulary: Vocabulary,
        audit: AuditSink,
        outcomes: OutcomeRecorder,
        policy: TokenPolicy | None = None,
    ) -> None:
        self._settings, self._auth, self._keys = settings, authenticator, keys
        self._vocabulary, self._audit, self._outcomes = vocabulary, audit, outcomes
        self.policy = policy
        #: RFC 9396 types (set by the composition root); None refuses every authorization_details.
        self.details: AuthorizationDetailsRegistry | None = None
        self.grants: dict[str, GrantHandler] = {"client_credentials": self._client_credentials}

    async def handle(self, form: Form, authorization: str | None) -> dict[str, Any]:
        """Return the RFC 6749 §5.1 body or raise the typed error (already audited)."""
        client: AuthenticatedClient | None = None
        grant_type = form.get("grant_type")
        try:
            if grant_type is None:
                raise InvalidRequestError("grant_type is required")
            client = await self._auth.authenticate(form, authorization, defer_replay=True)
            handler = self.grants.get(grant_type)
            if handler is None:
                raise UnsupportedGrantTypeError(f"grant_type {grant_type!r} is not supported"[:200])
            grant = await handler(form, client)
        except OAuth2Error as exc:
            await self._refuse(exc, form, client, grant_type)
            raise
        if (
            client.pending_use is None
            and grant.pending_use is None
            and not grant.decisions
            and not grant.unrevoked
        ):
            await self._audit.emit(self._issued(grant, grant_type))
        else:
            await self._record_issue(grant, form, client, grant_type)
        metrics.TOKENS_ISSUED.labels(grant_type=grant_type).inc()
        body: dict[str, Any] = {
            "access_token": grant.token.token,
            "token_type": "Bearer",
            "expires_in": grant.token.expires_in,
            "scope": grant.token.claims["scope"],
        }
        body.update(grant.response)
        return body

    async def _record_issue(
        self, grant: Grant, form: Form, auth: AuthenticatedClient, grant_type: str
    ) -> None:
        """Consume the assertion jti(s) and record the issue in one write; a replay refuses."""
        grant_error = grant.replay_error or InvalidGrantError("the assertion was already used")
        revoked_error = grant.revoked_error or InvalidGrantError("the grant's token was revoked")
        outcome = Outcome(
            auth.pending_use,
            self._issued(grant, grant_type),
            partial(self._refused, replayed(), form, auth, grant_type),
            grant.pending_use,
            partial(self._refused, grant_error, form, auth, grant_type),
            grant.decisions,
            grant.unrevoked,
            partial(self._refused, revoked_error, form, auth, grant_type),
        )
        result = await self._outcomes.record(outcome)
        if result is Recorded.REPLAYED:
            metrics.TOKEN_REFUSED.labels(error="invalid_client").inc()
            raise replayed()
        if result is Recorded.GRANT_REPLAYED:
            metrics.TOKEN_REFUSED.labels(error=grant_error.error).inc()
            raise grant_error
        if result is Recorded.REVOKED:
            metrics.TOKEN_REFUSED.labels(error=revoked_error.error).inc()
            raise revoked_error

    async def _refuse(
        self,
        exc: OAuth2Error,
        form: Form,
        client: AuthenticatedClient | None,
        grant_type: str | None,
    ) -> None:
        """Audit a refusal; an authenticated request still consumes its assertion, and a replayed
        assertion is refused as such (invalid_client) whatever else was wrong with the request."""
        refused = self._refused(exc, form, client, grant_type)
        decisions = exc.records if isinstance(exc, ScopeDenied) else ()
        if client is None or (client.pending_use is None and not decisions):
            metrics.TOKEN_REFUSED.labels(error=exc.error).inc()
            await self._audit.emit(refused)
            return
        on_replay = partial(self._refused, replayed(), form, client, grant_type)
        outcome = Outcome(client.pending_use, refused, on_replay, decisions=decisions)
        if await self._outcomes.record(outcome) is Recorded.RECORDED:
            metrics.TOKEN_REFUSED.labels(error=exc.error).inc()
            return
        metrics.TOKEN_REFUSED.labels(error="invalid_client").inc()
        raise replayed() from exc

    async def refuse_unparsed(self, exc: OAuth2Error) -> None:
        """A body that is not a valid form never reaches :meth:`handle`; it is a refusal all the
        same, and is audited like one."""
        metrics.TOKEN_REFUSED.labels(error=exc.error).inc()
        await self._audit.emit(self._refused(exc, Form({}, {}), None, None))

    async def _client_credentials(self, form: Form, auth: AuthenticatedClient) -> Grant:
        """RFC 6749 §4.4: the client acts for itself; ``sub`` = ``client_id``."""
        client = auth.client
        if "client_credentials" not in client.grant_types:
            raise UnauthorizedClientError("this client may not use the client_credentials grant")
        resource = select_resource(form.get_all("resource"), client, self._vocabulary)
        scopes = select_scopes(form.get("scope"), client, resource, self._vocabulary)
        details = self._requested_details(form, client)
        decisions = self.authorize_scopes(client, scopes, resource, "client_credentials")
        extra: dict[str, Any] = {"lei": client.lei}
        if details:
            extra["authorization_details"] = list(details)
        token = issue_access_token(
            self._keys.ring,
            issuer=self._settings.issuer,
            subject=client.client_id,
            client_id=client.client_id,
            audience=resource,
            scopes=scopes,
            lifetime=self._settings.access_token_lifetime,
            extra=extra,
        )
        if not details:
            return Grant(token, decisions=decisions)
        assert self.details is not None
        return Grant(
            token,
            decisions=decisions,
            response={"authorization_details": list(details)},  # RFC 9396 §7
            details_digest=self.details.digest(details),
        )

    def _requested_details(self, form: Form, client: Client) -> tuple[dict[str, Any], ...]:
        """RFC 9396 §6: on client_credentials the client's own registration (its
        ``authorization_details_types``) decides; an unknown or unregistered type, or malformed
        details, is ``invalid_authorization_details`` (§5), never silently dropped."""
        raw = form.get("authorization_details")
        if raw is None:
            return ()
        if self.details is None:
            raise InvalidAuthorizationDetailsError("authorization_details are not accepted here")
        return self.details.validate(raw, client)

    def authorize_scopes(
        self, client: Client, scopes: tuple[str, ...], resource: str, grant_type: str
    ) -> tuple[DecisionRecord, ...]:
        """Ask the policy decision point whether ``client`` may obtain ``scopes`` for ``resource``.

        Every grant calls this after choosing audience and scopes, and passes the result into its
        :class:`Grant`. A deny raises ``ScopeDenied`` (``invalid_scope``, RFC 6749 §5.2) carrying the
        decision records, which the refusal records with the same write."""
        if self.policy is None:
            return ()
        return self.policy.check(client, scopes, resource, grant_type)

    def _issued(self, grant: Grant, grant_type: str) -> AuditEvent:
        c = grant.token.claims
        mandate_id, mandate_version = grant.mandate or (None, None)
        return AuditEvent(
            type=AuditEventType.TOKEN_ISSUED,
            issuer=self._settings.issuer,
            subject=c["sub"],
            client_id=c["client_id"],
            audience=c["aud"],
            scopes=tuple(c["scope"].split()),
            jti=c["jti"],
            transaction_id=c.get("txn"),
            partner=c.get("partner"),
            actor_chain=grant.actor_chain,
            authorization_details_digest=grant.details_digest,
            mandate_id=mandate_id,
            mandate_version=mandate_version,
            decision="allow",
            payload={"grant_type": grant_type, "exp": c["exp"], **_origin(c), **grant.audit},
        )

    def _refused(
        self,
        exc: OAuth2Error,
        form: Form,
        client: AuthenticatedClient | None,
        grant_type: str | None,
    ) -> AuditEvent:
        client_id = client.client.client_id if client else None
        return AuditEvent(
            type=AuditEventType.TOKEN_REFUSED,
            issuer=self._settings.issuer,
            subject=client_id,
            client_id=client_id,
            # What the caller asked for, unvalidated: bounded so junk cannot bloat the audit trail.
            audience=next(iter(form.get_all("resource") + form.get_all("audience")), "")[:512]
            or None,
            scopes=tuple(s[:128] for s in (form.get("scope") or "").split()[:32]),
            jti=client.assertion_jti if client else None,
            partner=exc.partner,
            decision="deny",
            reason=exc.error,
            reason_ids=(exc.reason_id,) if exc.reason_id else (),
            payload={"grant_type": (grant_type or "")[:64], "detail": exc.debug[:500]},
        )


def _origin(claims: dict[str, Any]) -> dict[str, Any]:
    """A federated subject's origin (partner issuer and subject), kept in the issue record."""
    origin = claims.get("origin")
    return {"origin": origin} if origin is not None else {}
