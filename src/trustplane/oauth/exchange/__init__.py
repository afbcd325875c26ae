"""OAuth 2.0 Token Exchange (RFC 8693) at the token endpoint: delegation chains across issuers.

A client presents a ``subject_token`` (whose authority it wants to use) and, optionally, an
``actor_token`` (who acts); it gets a new RFC 9068 access token for one target audience that can only
narrow what the subject token carried. See docs/token_exchange.md for the rules in full.

Subject tokens:

- ``urn:ietf:params:oauth:token-type:access_token``: one of OUR access tokens (``typ: at+jwt``,
  ``iss`` = our issuer, signature by our keys, not expired, not revoked, its client active, its
  mandate usable now), or a trusted partner's access token (``typ: at+jwt``, verified by the partner
  registry with that partner's keys only);
- ``urn:ietf:params:oauth:token-type:jwt``: a partner assertion (``typ`` absent or ``JWT``); its
  ``jti`` is single-use, consumed with the outcome like a jwt-bearer assertion.

Anything else (``id_token``, ``refresh_token``, SAML, an ID token or client assertion or logout token
presented as an access token) is ``invalid_request``.

Who may exchange (RFC 8693 §2.1-2.2, §4.4, §5; ``oauth.exchange.rights``): one of OUR tokens only
its own client, a client named in its ``may_act``, or the operator-made resource server for its
``aud``; a partner's token only when addressed to this server or to such a resource server. Being
able to call a resource server never makes a client that resource server. Anyone else is
``invalid_request``, reason ``not_entitled``.

A subject token carrying one of our mandates is exchanged only where the PDP agrees that the
exchanging client is related to the mandate's grantee: the ``token:exchange`` request carries
``context.mandate`` (id, version, grantor, grantee legal entity, grantee client) and the
``exchange_right``; the default bundle forbids an exchange by a client that is neither the grantee
client nor a client of the grantee's legal entity (``exchange.mandate_grantee``).

Repeated exchange of one access token by an entitled client is not counted or capped: RFC 8693 lets
a legitimate actor exchange the token it holds for each downstream call, every derived token ends
no later than the subject token, each exchange is decided and recorded, and revoking the subject
token stops further exchanges of it. (A partner assertion, ``jwt``, stays single-use.)

The issued token: ``sub`` of the subject (partner subjects stay namespaced, with ``origin``),
``client_id`` of the exchanging client, ``act`` = the current actor with the subject token's ``act``
nested inside it, ``txn`` kept (or minted), ``mandate`` kept and re-checked (our own mandates only;
a partner's mandate reference travels in ``prv``), ``prv`` = ``{iss, jti}`` of the subject token
with the subject token's own ``prv`` nested (the provenance chain), ``exp`` never after the subject
token's.

Impersonation: a client that sends ``exchange_mode=impersonation`` (a trustplane extension parameter,
RFC 8693 §2.1 allows them) asks for a token WITHOUT ``act``: it then speaks as the subject. It is
issued only when the PDP permits it (``impersonation: true`` in the decision context; the default
bundle forbids it), never with an ``actor_token``, and never for a subject token that is itself
delegated (its ``act`` history would be dropped). The ledger records who impersonated whom.

The package: ``subject`` verifies the subject token, ``actor`` the actor token and ``may_act``,
``rights`` says who may exchange, ``claims`` builds the ``act``/``prv`` claims of the issued token,
``grant`` orchestrates the grant (target, scopes, the one ``TokenPolicy``, issuance). Partner
verification and the single use of a partner assertion are shared with the JWT-bearer grant
(``federation.partner_assertions``).
"""

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
