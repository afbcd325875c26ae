"""The ``authorization_code`` (RFC 6749 §4.1.3, RFC 7636 §4.6) and ``refresh_token`` (RFC 6749 §6)
grants, served by :class:`trustplane.oauth.token_endpoint.TokenEndpoint` (``oauth.grant``).

Codes: single use, at most 60 s, bound to the client, the redirect URI and the PKCE challenge. A
second redemption (also a concurrent one: the loser of the conditional UPDATE) is ``invalid_grant``
and revokes what the first one issued (RFC 6749 §4.1.2, RFC 9700 §4.5): its access token (by jti)
and its refresh family. A code presented by another client is ``invalid_grant`` and spends the
code (its own client's redemption after that is a reuse), or, if it was already redeemed, revokes
what it issued: the code has leaked (RFC 6749 §10.5).

Refresh tokens: rotated on every use (RFC 9700 §4.14.2); presenting a rotated token again is
``invalid_grant`` and revokes the whole family and the access tokens issued from it. Racing refreshes
with one token: one wins the conditional UPDATE, the other is treated as the reuse it is
indistinguishable from. The family keeps the absolute expiry of its first token. Under the fapi2
profile there is no rotation (FAPI 2.0 Security Profile §5.3.2.1 clause 10): the token stays valid
and is not returned again.

Sender binding (the request's binding is decided by the token endpoint, ``grant.binding``, and
every token the grants issue carries it): a code issued for a request with ``dpop_jkt`` (RFC 9449
§10; or a DPoP proof at PAR) is redeemed only with a DPoP proof of that key, else ``invalid_grant``.
Refresh tokens are not bound: RFC 9449 §5 and RFC 8705 §4 bind those of public clients only, and
every trustplane client authenticates (a confidential client's refresh token is already
sender-constrained by its authentication), so a client may change its DPoP key at refresh.

The mandate is checked (``check_usable``) at code redemption and at every refresh: a revoked,
suspended, expired or superseded mandate is ``invalid_grant``. The consumption of a code (or the
rotation of a refresh token) and the new refresh token are one transaction, durable before the
token is returned.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from trustplane.authorize import pkce
from trustplane.authorize.revocation import DelegatedRevocations
from trustplane.authorize.store import (
    CodeStore,
    GrantContext,
    StoredCode,
    StoredRefresh,
    new_secret_value,
)
from trustplane.clients.authentication import AuthenticatedClient
from trustplane.clients.model import Client
from trustplane.errors import (
    InvalidGrantError,
    InvalidScopeError,
    InvalidTargetError,
)
from trustplane.grant.binding import current_binding
from trustplane.grant.contract import Granted, TokenIssuer
from trustplane.ids import new_jti
from trustplane.mandates.errors import MandateUnusableError
from trustplane.mandates.service import MandateService
from trustplane.policy.enforcement import TokenPolicy
from trustplane.policy.recorder import DecisionRecord
from trustplane.profile import rotates_refresh_tokens
from trustplane.protocol.form import Form
from trustplane.protocol.tokens import IssuedToken
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings
from trustplane.storage.db import Database


class _DelegatedGrant:
    """What the two grants share: the mandate check, details narrowing, the policy, issuance."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        tokens: TokenIssuer,
        policy: TokenPolicy,
        mandates: MandateService,
        details: AuthorizationDetailsRegistry,
        revocations: DelegatedRevocations,
    ) -> None:
        self._settings, self._db, self._tokens, self._policy = settings, db, tokens, policy
        self._mandates, self._details, self._revocations = mandates, details, revocations
        self._refresh = revocations.refresh

    async def _check_mandate(self, grant: GrantContext, now: int) -> None:
        try:
            await self._mandates.check_usable(grant.mandate_id, grant.mandate_version, now)
        except MandateUnusableError as exc:
            raise exc.to_oauth() from None

    @staticmethod
    def _check_resource(grant: GrantContext, form: Form) -> None:
        """RFC 8707 §2.2: a ``resource`` sent with the code or the refresh token must be the one
        audience the grant is for (``invalid_target``), never ignored."""
        resources = form.get_all("resource")
        if resources and resources != [grant.resource]:
            raise InvalidTargetError("resource must be the audience this grant was issued for")

    def _narrow_details(self, grant: GrantContext, form: Form, client: Client) -> GrantContext:
        """RFC 9396 §6: ``authorization_details`` in the token request must be valid, of types the
        client registered, and within what the grant holds; otherwise ``invalid_authorization_details``
        (an unknown type included, §5). Absent: the whole grant."""
        requested = form.get("authorization_details")
        if requested is None:
            return grant
        details = self._details.narrow(requested, client, grant.authorization_details)
        return GrantContext(**{**_fields(grant), "authorization_details": details})

    def _decide(
        self, client: Client, grant: GrantContext, grant_type: str
    ) -> tuple[DecisionRecord, ...]:
        """The PDP decides before anything single-use is consumed: a deny (``invalid_scope``)
        leaves the code or refresh token as it was."""
        return self._policy.check(client, grant.scopes, grant.resource, grant_type)

    def _issue(self, grant: GrantContext) -> IssuedToken:
        """RFC 9068 access token for the user (``sub``), bound to the mandate version."""
        extra: dict[str, Any] = {
            "lei": grant.user_lei,
            "mandate": {"id": grant.mandate_id, "version": grant.mandate_version},
        }
        if grant.authorization_details:
            extra["authorization_details"] = list(grant.authorization_details)
        if grant.auth_time is not None:
            extra["auth_time"] = grant.auth_time
        if grant.acr is not None:
            extra["acr"] = grant.acr
        return self._tokens.issue(
            subject=grant.user_id,
            client_id=grant.client_id,
            audience=grant.resource,
            scopes=grant.scopes,
            extra=extra,
        )

    def _granted(
        self,
        issued: IssuedToken,
        grant: GrantContext,
        refresh: str | None,
        decisions: tuple[DecisionRecord, ...],
    ) -> Granted:
        response: dict[str, Any] = {}
        if refresh is not None:
            response["refresh_token"] = refresh
        if grant.authorization_details:  # RFC 9396 §7: the token response says what was granted
            response["authorization_details"] = list(grant.authorization_details)
        return Granted(
            token=issued,
            response=response,
            mandate=(grant.mandate_id, grant.mandate_version),
            details_digest=self._details.digest(grant.authorization_details),
            decisions=decisions,
        )


class AuthorizationCodeGrant(_DelegatedGrant):
    grant_type: ClassVar[str] = "authorization_code"
    label: ClassVar[str] = "authorization_code"
    commits_before_outcome: ClassVar[bool] = True  # the code's redemption (grant.contract)

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        tokens: TokenIssuer,
        policy: TokenPolicy,
        mandates: MandateService,
        details: AuthorizationDetailsRegistry,
        revocations: DelegatedRevocations,
        codes: CodeStore,
    ) -> None:
        super().__init__(
            settings=settings,
            db=db,
            tokens=tokens,
            policy=policy,
            mandates=mandates,
            details=details,
            revocations=revocations,
        )
        self._codes = codes

    async def handle(self, form: Form, auth: AuthenticatedClient) -> Granted:
        client = auth.client
        code = form.require("code")
        async with self._db.read() as conn:
            stored = await self._codes.get(conn, code)
        if stored is None:
            raise InvalidGrantError("the authorization code is invalid")
        if stored.grant.client_id != client.client_id:
            await self._spend_leaked(code, stored)
            raise InvalidGrantError(
                "the authorization code was issued to another client",
                debug=f"code of {stored.grant.client_id} presented by {client.client_id}",
            )
        if stored.used_at is not None:
            await self._revocations.code_reused(stored)
            raise InvalidGrantError("the authorization code was already used")
        now = int(time.time())
        self._check_code(stored, form, now)
        self._check_resource(stored.grant, form)
        grant = self._narrow_details(stored.grant, form, client)
        await self._check_mandate(stored.grant, now)
        decisions = self._decide(client, grant, "authorization_code")
        issued = self._issue(grant)
        with_refresh = "refresh_token" in client.grant_types
        refresh, family = (new_secret_value(), new_jti()) if with_refresh else (None, None)
        async with self._db.transaction() as conn:
            won = await self._codes.consume(
                conn,
                code,
                now,
                access_jti=issued.claims["jti"],
                access_exp=issued.claims["exp"],
                family_id=family,
            )
            if won and refresh is not None and family is not None:
                expires = now + self._settings.refresh_token_lifetime
                await self._refresh.create(
                    conn,
                    refresh,
                    family,
                    stored.grant,
                    now=now,
                    expires_at=expires,
                    access_jti=issued.claims["jti"],
                    access_exp=issued.claims["exp"],
                )
        if not won:  # lost the race to a concurrent redemption: that is reuse too
            async with self._db.read() as conn:
                latest = await self._codes.get(conn, code)
            if latest is not None and latest.used_at is not None:
                await self._revocations.code_reused(latest)
                raise InvalidGrantError("the authorization code was already used")
            raise InvalidGrantError("the authorization code has expired")
        return self._granted(issued, grant, refresh, decisions)

    async def _spend_leaked(self, code: str, stored: StoredCode) -> None:
        """A code presented by another client than its own has leaked (RFC 6749 §4.1.3: it must
        have been "issued to the authenticated confidential client"; §10.5: "If the authorization
        server observes multiple attempts to exchange an authorization code ... SHOULD attempt to
        revoke all access tokens already granted based on the compromised authorization code").
        It is spent, unredeemed, by the same conditional UPDATE as a redemption (its own client's
        later redemption is then ``invalid_grant``, as a reuse), and what it already produced (its
        client redeemed it first, or won the race) is revoked as on a reuse."""
        if stored.used_at is None:
            async with self._db.transaction() as conn:
                spent = await self._codes.consume(
                    conn, code, int(time.time()), access_jti=None, access_exp=None, family_id=None
                )
            if spent:
                return
            async with self._db.read() as conn:  # lost to a redemption, or expired
                latest = await self._codes.get(conn, code)
            if latest is None or latest.used_at is None:
                return
            stored = latest
        await self._revocations.code_reused(stored)

    def _check_code(self, stored: StoredCode, form: Form, now: int) -> None:
        if stored.expires_at <= now:
            raise InvalidGrantError("the authorization code has expired")
        if stored.dpop_jkt is not None and current_binding().jkt != stored.dpop_jkt:
            raise InvalidGrantError(  # RFC 9449 §10
                "the authorization code is bound to a DPoP key (dpop_jkt); present a proof of it",
                debug="dpop_jkt: no proof, or a proof of another key, at code redemption",
            )
        redirect_uri = form.get("redirect_uri")
        if (stored.redirect_uri_given or redirect_uri is not None) and (
            redirect_uri != stored.redirect_uri
        ):
            raise InvalidGrantError("redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier")
        if stored.code_challenge is None:
            if verifier is not None:  # RFC 9700 §2.1.1: no verifier without a challenge
                raise InvalidGrantError("code_verifier sent for a code issued without PKCE")
            return
        if verifier is None:
            raise InvalidGrantError("code_verifier is required (PKCE)")
        if not pkce.verifier_matches(verifier, stored.code_challenge):
            raise InvalidGrantError("code_verifier does not match the code_challenge")


class RefreshTokenGrant(_DelegatedGrant):
    grant_type: ClassVar[str] = "refresh_token"
    label: ClassVar[str] = "refresh_token"
    commits_before_outcome: ClassVar[bool] = True  # the rotation (grant.contract)

    async def handle(self, form: Form, auth: AuthenticatedClient) -> Granted:
        client = auth.client
        token = form.require("refresh_token")
        async with self._db.read() as conn:
            stored = await self._refresh.get(conn, token)
        now = int(time.time())
        if stored is None or stored.grant.client_id != client.client_id:
            raise InvalidGrantError("the refresh token is invalid")
        if stored.revoked_at is not None:
            raise InvalidGrantError("the refresh token has been revoked")
        if stored.rotated_at is not None:
            await self._revocations.family_reused(stored.family_id, stored.grant)
            raise InvalidGrantError("the refresh token was already used")
        if stored.expires_at <= now:
            raise InvalidGrantError("the refresh token has expired")
        grant = self._narrow_details(self._narrow(stored.grant, form), form, client)
        await self._check_mandate(stored.grant, now)
        decisions = self._decide(client, grant, "refresh_token")
        issued = self._issue(grant)
        if not rotates_refresh_tokens(self._settings, client.metadata):
            await self._keep(token, stored, issued, now)
            return self._granted(issued, grant, None, decisions)
        successor = new_secret_value()
        async with self._db.transaction() as conn:
            won = await self._refresh.rotate(conn, token, now)
            if won:
                await self._refresh.create(
                    conn,
                    successor,
                    stored.family_id,
                    stored.grant,
                    now=now,
                    expires_at=stored.expires_at,
                    access_jti=issued.claims["jti"],
                    access_exp=issued.claims["exp"],
                )
        if not won:
            await self._revocations.family_reused(stored.family_id, stored.grant)
            raise InvalidGrantError("the refresh token was already used")
        return self._granted(issued, grant, successor, decisions)

    async def _keep(self, token: str, stored: StoredRefresh, issued: IssuedToken, now: int) -> None:
        """The fapi2 profile (FAPI 2.0 Security Profile §5.3.2.1 clause 10): no rotation, the
        refresh token stays valid and is not returned again (RFC 6749 §6). The new access token is
        recorded in the family (a row whose token value is never disclosed, marked used) so that
        revoking the family revokes it too; a revocation that committed meanwhile wins."""
        async with self._db.transaction() as conn:
            current = await self._refresh.get(conn, token, lock=True)  # a revocation waits
            if current is None or current.revoked_at is not None:
                raise InvalidGrantError("the refresh token has been revoked")
            record = new_secret_value()
            await self._refresh.create(
                conn,
                record,
                stored.family_id,
                stored.grant,
                now=now,
                expires_at=stored.expires_at,
                access_jti=issued.claims["jti"],
                access_exp=issued.claims["exp"],
            )
            await self._refresh.rotate(conn, record, now)

    def _narrow(self, grant: GrantContext, form: Form) -> GrantContext:
        """RFC 6749 §6: a refresh may ask for fewer scopes, never more; RFC 8707 §2.2: the resource,
        if sent, must be the one audience the grant is for."""
        self._check_resource(grant, form)
        requested = form.get("scope")
        if requested is None:
            return grant
        names = tuple(dict.fromkeys(requested.split()))
        if not names or not set(names) <= set(grant.scopes):
            raise InvalidScopeError("a refresh may only narrow the granted scopes")
        return GrantContext(**{**_fields(grant), "scopes": names})


def _fields(grant: GrantContext) -> dict[str, Any]:
    return {name: getattr(grant, name) for name in GrantContext.__slots__}
