"""What a grant is to the token endpoint (RFC 6749 §4, §6 and the extension grants of §4.5).

A grant is a class that declares its ``grant_type`` and receives everything it needs in its
constructor; ``oauth.wiring.build_token_endpoint`` builds every grant and hands the list to the
:class:`~trustplane.oauth.token_endpoint.TokenEndpoint`. The endpoint authenticates the client,
refuses a client not registered for the grant type, and calls :meth:`TokenGrant.handle`, which
chooses audience and scopes, asks the one :class:`~trustplane.policy.enforcement.TokenPolicy`
before it consumes anything single-use, signs with the one :class:`TokenIssuer` and returns a
:class:`Granted`. What must still hold when the outcome is committed (a ``jti`` not used before,
a token not revoked) goes in ``Granted.conditions``; the endpoint checks them in the outcome's
transaction and answers the error of the first that fails (``oauth.outcomes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from trustplane.clients.authentication import AuthenticatedClient
from trustplane.grant.binding import current_binding
from trustplane.grant.outcomes import Condition
from trustplane.keys.service import KeyService
from trustplane.policy.recorder import DecisionRecord
from trustplane.protocol.form import Form
from trustplane.protocol.tokens import IssuedToken, issue_access_token
from trustplane.settings import Settings


@dataclass(frozen=True, slots=True, kw_only=True)
class Granted:
    """What a grant decided: the token to return. ``response``: extra response members (RFC 6749
    §5.1 ``refresh_token``, RFC 9396 §7 ``authorization_details``, RFC 8693 §2.2.1
    ``issued_token_type``); ``mandate`` and ``details_digest``: what the audit record names;
    ``decisions``: the policy decisions that allowed it (recorded in the same transaction as the
    issuance); ``conditions``: what the outcome's transaction must find true for the token to stand."""

    token: IssuedToken
    response: dict[str, Any] = field(default_factory=dict)
    mandate: tuple[str, int] | None = None
    details_digest: str | None = None
    decisions: tuple[DecisionRecord, ...] = ()
    conditions: tuple[Condition, ...] = ()
    #: RFC 8693 token exchange: the ``act`` chain (outermost first) and what the issue record names
    #: beyond the envelope (the subject token's issuer and jti, the token types).
    actor_chain: tuple[str, ...] = ()
    audit: dict[str, Any] = field(default_factory=dict)


class TokenGrant(Protocol):
    """A grant that commits single-use state of its own before the outcome (an authorization
    code's redemption, a refresh token's rotation) says so with a class attribute
    ``commits_before_outcome = True``: the endpoint then consumes the request's own single-use
    credentials (the client assertion's ``jti``, the DPoP proof's) before calling it, so a replayed
    one is refused before the code or the token is used up (:func:`commits_before_outcome`)."""

    #: The ``grant_type`` value this grant answers (RFC 6749 §4.1.3, §4.4.2, §6; RFC 7523 §2.1;
    #: RFC 8693 §2.1), and its name in ``unauthorized_client`` descriptions.
    grant_type: ClassVar[str]
    label: ClassVar[str]

    async def handle(self, form: Form, auth: AuthenticatedClient) -> Granted:
        """Decide and sign, or raise the typed error. Called only for a client registered for
        :attr:`grant_type`."""
        ...


def commits_before_outcome(grant: TokenGrant | None) -> bool:
    """Whether ``grant`` writes single-use state before the outcome (see :class:`TokenGrant`)."""
    return bool(getattr(grant, "commits_before_outcome", False))


class TokenIssuer:
    """The one way a grant signs an RFC 9068 access token: our issuer, the current signing key,
    the configured lifetime (capped by ``not_after``, the end of what the token derives from), and
    the request's sender binding (``cnf``, :mod:`trustplane.grant.binding`), whatever the grant."""

    def __init__(self, settings: Settings, keys: KeyService) -> None:
        #: Our issuer identifier (``iss``; the audience partners address their assertions to).
        self.issuer = settings.issuer
        self._lifetime, self._keys = settings.access_token_lifetime, keys

    def issue(
        self,
        *,
        subject: str,
        client_id: str,
        audience: str,
        scopes: tuple[str, ...],
        extra: dict[str, Any],
        not_after: int | None = None,
    ) -> IssuedToken:
        binding = current_binding()
        if binding.cnf is not None:
            extra = {**extra, **binding.claims()}
        return issue_access_token(
            self._keys.ring,
            issuer=self.issuer,
            subject=subject,
            client_id=client_id,
            audience=audience,
            scopes=scopes,
            lifetime=self._lifetime,
            extra=extra,
            not_after=not_after,
        )
