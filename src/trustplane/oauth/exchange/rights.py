"""Who may exchange a subject token (RFC 8693 §2.1-2.2, §4.4, §5): the rule before any policy.

RFC 8693 §5 leaves it to the authorization server to decide which clients may exchange which tokens;
holding a bearer token is not such a right, and being able to *call* a resource server
(``allowed_resources``, written by the client itself at registration) never makes a client that
resource server. One of OUR access tokens may be exchanged only by

- the client it was issued to, when its ``aud`` is this server or one of that client's
  ``allowed_resources`` (:data:`SUBJECT_CLIENT`);
- a client the token names in ``may_act`` (RFC 8693 §4.4; :data:`MAY_ACT`);
- a client the OPERATOR made the resource server for the token's ``aud`` (``resource_server_for``,
  never self-declared: ``clients.metadata``; :data:`RESOURCE_SERVER`).

A partner's token must be addressed to this server (:data:`PARTNER`) or to an audience the client
is the operator-made resource server for. Everything else is ``invalid_request`` (RFC 8693 §2.2.2:
a subject token "unacceptable based on policy"), reason ``not_entitled`` or ``audience``. The right
found travels to the PDP as ``exchange_right``.
"""

from __future__ import annotations

from trustplane import metrics
from trustplane.clients.model import Client
from trustplane.errors import InvalidRequestError
from trustplane.protocol.tokens import VerifiedClaims

SUBJECT_CLIENT, MAY_ACT, RESOURCE_SERVER, PARTNER = (
    "subject_client", "may_act", "resource_server", "partner",
)  # fmt: skip


def _elsewhere(aud: object) -> InvalidRequestError:
    return InvalidRequestError(
        "the subject_token is addressed to an audience this client cannot exchange from",
        debug=f"aud={str(aud)[:200]}",
        reason_id="audience",
    )


def own_token_right(claims: VerifiedClaims, aud: object, client: Client, issuer: str) -> str:
    """The right by which ``client`` may exchange one of our access tokens, or the refusal. The
    token's own client is asked first, so its audience mistake is reported as ``audience``."""
    if isinstance(aud, list) and len(aud) == 1:
        aud = aud[0]
    if claims.get("client_id") == client.client_id:
        if aud == issuer or aud in client.allowed_resources:
            return SUBJECT_CLIENT
        raise _elsewhere(aud)
    if names_client(claims.get("may_act"), client, issuer):
        return MAY_ACT
    if isinstance(aud, str) and aud in client.resource_server_for:
        return RESOURCE_SERVER
    metrics.TOKEN_RIGHTS_REFUSED.labels(endpoint="token_exchange", reason="not_entitled").inc()
    raise InvalidRequestError(
        "this client may not exchange the subject_token: it was issued to another client, does "
        "not name this client in may_act, and this client is not the resource server for its "
        "audience",
        debug=f"subject client {str(claims.get('client_id'))[:128]}, aud {str(aud)[:200]}",
        reason_id="not_entitled",
    )


def names_client(may_act: object, client: Client, issuer: str) -> bool:
    """RFC 8693 §4.4: ``may_act`` names this client (``sub`` or ``client_id``; ``iss``, when
    present, must be this server, where our client ids are defined)."""
    if not isinstance(may_act, dict):
        return False
    if may_act.get("iss", issuer) != issuer:
        return False
    return client.client_id in (may_act.get("sub"), may_act.get("client_id"))


def partner_token_audience(aud: object, client: Client, issuer: str) -> tuple[str, str]:
    """The audience to verify a partner's token against, and the right: addressed to this server,
    or to an audience the operator made this client the resource server for; never to one it only
    calls."""
    if aud == issuer:
        return issuer, PARTNER
    if isinstance(aud, str) and aud in client.resource_server_for:
        return aud, RESOURCE_SERVER
    raise _elsewhere(aud)
