"""The token endpoint (RFC 6749 §3.2): authenticate the client, dispatch on ``grant_type``, issue.

Every outcome is an audit event, durable before the response: ``oauth:token:issued`` with the token's
jti, audience and scopes, or ``oauth:token:refused`` with the wire error and the log-only reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from trustplane import metrics
from trustplane.audit.events import AuditEvent, AuditEventType
from trustplane.audit.sink import AuditSink
from trustplane.clients.model import Client
from trustplane.errors import (
    InvalidClientError,
    InvalidRequestError,
    OAuth2Error,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from trustplane.keys.service import KeyService
from trustplane.oauth.client_auth import AuthenticatedClient, ClientAuthenticator
from trustplane.oauth.form import Form
from trustplane.oauth.outcomes import Outcome, OutcomeRecorder
from trustplane.oauth.resources import select_resource, select_scopes
from trustplane.oauth.scopes import Vocabulary
from trustplane.oauth.tokens import IssuedToken, issue_access_token
from trustplane.policy.enforcement import ScopeDenied, TokenPolicy
from trustplane.policy.recorder import DecisionRecord
from trustplane.settings import Settings


@dataclass(frozen=True, slots=True)
class Grant:
    """What a grant handler decided: the token to return, and the policy decisions that allowed it
    (recorded in the same transaction as the issuance)."""

    token: IssuedToken
    decisions: tuple[DecisionRecord, ...] = ()


def replayed() -> InvalidClientError:
    """RFC 7523 §3 item 7: the assertion's jti was used before."""
    return InvalidClientError("client assertion was already used", debug="jti replay")


GrantHandler = Callable[[Form, AuthenticatedClient], Awaitable[Grant]]


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
        if client.pending_use is None and not grant.decisions:
            await self._audit.emit(self._issued(grant.token, grant_type))
        else:
            auth, issued = client, self._issued(grant.token, grant_type)
            on_replay = partial(self._refused, replayed(), form, auth, grant_type)
            outcome = Outcome(client.pending_use, issued, on_replay, grant.decisions)
            if not await self._outcomes.record(outcome):
                metrics.TOKEN_REFUSED.labels(error="invalid_client").inc()
                raise replayed()
        metrics.TOKENS_ISSUED.labels(grant_type=grant_type).inc()
        body: dict[str, Any] = {
            "access_token": grant.token.token,
            "token_type": "Bearer",
            "expires_in": grant.token.expires_in,
            "scope": grant.token.claims["scope"],
        }
        return body

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
        outcome = Outcome(client.pending_use, refused, on_replay, decisions)
        if await self._outcomes.record(outcome):
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
        decisions = self.authorize_scopes(client, scopes, resource, "client_credentials")
        token = issue_access_token(
            self._keys.ring,
            issuer=self._settings.issuer,
            subject=client.client_id,
            client_id=client.client_id,
            audience=resource,
            scopes=scopes,
            lifetime=self._settings.access_token_lifetime,
            extra={"lei": client.lei},
        )
        return Grant(token, decisions)

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

    def _issued(self, token: IssuedToken, grant_type: str) -> AuditEvent:
        c = token.claims
        return AuditEvent(
            type=AuditEventType.TOKEN_ISSUED,
            issuer=self._settings.issuer,
            subject=c["sub"],
            client_id=c["client_id"],
            audience=c["aud"],
            scopes=tuple(c["scope"].split()),
            jti=c["jti"],
            transaction_id=c.get("txn"),
            decision="allow",
            payload={"grant_type": grant_type, "exp": c["exp"]},
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
            audience=next(iter(form.get_all("resource")), "")[:512] or None,
            scopes=tuple(s[:128] for s in (form.get("scope") or "").split()[:32]),
            jti=client.assertion_jti if client else None,
            decision="deny",
            reason=exc.error,
            payload={"grant_type": (grant_type or "")[:64], "detail": exc.debug[:500]},
        )
