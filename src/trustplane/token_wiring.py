"""Builds the token endpoint and every grant it serves, in one place (``trustplane.app`` calls it).
It sits above the packages whose grants it lists (oauth, authorize, federation), beside ``app``.

Adding a grant (docs/architecture.md, "How to add a grant"): a class with a ``grant_type`` that takes
what it needs in its constructor, built here and listed in ``grants``. Every grant asks the one
:class:`TokenPolicy` built here and signs with the one :class:`TokenIssuer`.
"""

from __future__ import annotations

from trustplane.audit.sink import AuditSink
from trustplane.authorize.grants import AuthorizationCodeGrant, RefreshTokenGrant
from trustplane.authorize.revocation import DelegatedRevocations
from trustplane.authorize.store import CodeStore
from trustplane.clients.authentication import ClientAuthenticator
from trustplane.clients.service import ClientRegistry
from trustplane.dpop import verifier_from_settings
from trustplane.federation.jwt_bearer import JwtBearerGrant
from trustplane.federation.partner_assertions import PartnerAssertions
from trustplane.federation.registry import PartnerRegistry
from trustplane.grant.contract import TokenGrant, TokenIssuer
from trustplane.grant.outcomes import OutcomeRecorder
from trustplane.keys.service import KeyService
from trustplane.mandates.service import MandateService
from trustplane.oauth.client_credentials import ClientCredentialsGrant
from trustplane.oauth.exchange.actor import ActorTokens
from trustplane.oauth.exchange.grant import TokenExchangeGrant
from trustplane.oauth.exchange.subject import SubjectTokens
from trustplane.oauth.exchange.txn_token import TxnTokenService
from trustplane.oauth.token_endpoint import TokenEndpoint
from trustplane.policy.enforcement import TokenPolicy
from trustplane.policy.engine import PolicyEngine
from trustplane.protocol.replay import ReplayCache
from trustplane.protocol.revocations import RevocationStore
from trustplane.protocol.scopes import Vocabulary
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings
from trustplane.storage.db import Database
from trustplane.storage.writer import GroupCommitWriter


def build_token_endpoint(
    *,
    settings: Settings,
    db: Database,
    writer: GroupCommitWriter,
    keys: KeyService,
    vocabulary: Vocabulary,
    audit: AuditSink,
    authenticator: ClientAuthenticator,
    replay: ReplayCache,
    engine: PolicyEngine,
    details: AuthorizationDetailsRegistry,
    mandates: MandateService,
    clients: ClientRegistry,
    partners: PartnerRegistry,
    codes: CodeStore,
    delegated: DelegatedRevocations,
    revocations: RevocationStore,
    kek: bytes,
) -> TokenEndpoint:
    """The endpoint with client_credentials, authorization_code, refresh_token, jwt-bearer and
    token-exchange. ``TRUSTPLANE_POLICY_TOKEN_ENFORCEMENT=false`` turns the policy check of every
    grant off at once. ``kek``: the key-encryption key, from which the DPoP nonce key is derived
    (every instance accepts every instance's nonces); DPoP proof ``jti``s share ``replay``."""
    tokens = TokenIssuer(settings, keys)
    policy = TokenPolicy(engine if settings.policy_token_enforcement else None)
    assertions = PartnerAssertions(registry=partners, replay=replay, clock_skew=settings.clock_skew)
    subjects = SubjectTokens(
        issuer=settings.issuer, keys=keys, clients=clients, mandates=mandates, partners=assertions
    )
    grants: list[TokenGrant] = [
        ClientCredentialsGrant(
            tokens=tokens, policy=policy, vocabulary=vocabulary, details=details
        ),
        AuthorizationCodeGrant(
            settings=settings,
            db=db,
            tokens=tokens,
            policy=policy,
            mandates=mandates,
            details=details,
            revocations=delegated,
            codes=codes,
        ),
        RefreshTokenGrant(
            settings=settings,
            db=db,
            tokens=tokens,
            policy=policy,
            mandates=mandates,
            details=details,
            revocations=delegated,
        ),
        JwtBearerGrant(tokens=tokens, policy=policy, vocabulary=vocabulary, partners=assertions),
        TokenExchangeGrant(
            tokens=tokens,
            policy=policy,
            vocabulary=vocabulary,
            details=details,
            subjects=subjects,
            actors=ActorTokens(issuer=settings.issuer, keys=keys, db=db, revocations=revocations),
            partners=assertions,
            # draft-ietf-oauth-transaction-tokens-10: requested_token_type=...:txn_token
            txn_tokens=TxnTokenService(
                settings=settings, keys=keys, subjects=subjects, details=details
            ),
        ),
    ]
    return TokenEndpoint(
        settings=settings,
        authenticator=authenticator,
        audit=audit,
        outcomes=OutcomeRecorder(writer),
        grants=grants,
        dpop=verifier_from_settings(settings, kek, replay),
        defer_proof_replay=replay.deferrable,
    )
