"""Transaction Tokens (draft-ietf-oauth-transaction-tokens-10): the Txn-Token service (TTS), a mode
of the token-exchange grant (draft §11, a profile of RFC 8693).

A request with ``requested_token_type=urn:ietf:params:oauth:token-type:txn_token`` (§11.1: also
``audience`` = the trust domain and ``scope``, both REQUIRED, a missing ``audience`` is
``invalid_request``, a missing ``scope`` ``invalid_scope`` as RFC 6749 §3.3 says) is answered with a
Txn-Token: a JWS with header ``typ: txntoken+jwt`` and the draft's claims (§9.2)

- ``iss``, ``iat``, ``exp`` (``txn_token_lifetime``, default 60 s, never after the subject token),
  ``aud`` = the trust domain (``trust_domain``, default the issuer), ``jti``;
- ``txn``: the subject token's ``txn`` (trustplane's transaction id), or a new one;
- ``sub``: the subject token's subject; ``scope``: the requested scopes, only ever narrower (§13.6;
  a subject token without scopes bounds nothing and is refused, §13.14);
- ``req_wl``: a string, the requesting workload (the requester's client id); on a replacement
  ``req_wl_chain`` lists the workloads that requested each token of the chain, oldest first and
  ending with ``req_wl`` (§13.15: the call chain is kept; the draft leaves the mechanism open);
- ``tctx`` (transaction context) from the ``request_details`` parameter: the trade (ids, side,
  quantity, amount, instrument, venue, account, action, approval state, ``origin`` ``auto`` or
  ``manual``), checked against the subject token's ``authorization_details`` (the tctx can never
  exceed what the access token authorizes) plus the ``authorization_details_digest`` we compute;
- ``rctx`` (request context) from the ``request_context`` parameter (``req_ip``, ``authn``) plus
  the external client (``client_id``) and its legal entity (``lei``) from the subject token.

``request_details`` and ``request_context`` are JSON objects (§11.1), at most ``MAX_PARAMETER``
characters, sent as JSON or base64url-encoded JSON; any other shape is ``invalid_request``.

A replacement Txn-Token (``subject_token_type`` = the txn_token URN, §13.15) keeps ``txn``,
``sub``, ``aud``, ``rctx`` and the digest, never ends after the token it replaces (so never comes
from an expired one), and can only narrow ``scope`` and ``tctx``: every member must be present in
the old ``tctx`` with the same value, or (for ``quantity`` and ``amount``) a smaller one; anything
else is ``invalid_request``.

Only a client the operator made a Txn-Token requester (``txn_token_requester``, operator-only, like
``resource_server_for``) may ask (§11.3, §13.10): anyone else is ``unauthorized_client``; the
subject access token must moreover be one the requester may exchange (``oauth.exchange.rights``).
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

import orjson

from trustplane.clients.model import Client
from trustplane.errors import (
    InvalidRequestError,
    InvalidScopeError,
    InvalidTargetError,
    UnauthorizedClientError,
)
from trustplane.grant.contract import Granted
from trustplane.grant.outcomes import Condition, NotRevoked
from trustplane.ids import new_jti
from trustplane.jose.jws import JWSError, parse
from trustplane.keys.service import KeyService
from trustplane.oauth.exchange.subject import Subject, SubjectTokens, revoked, unacceptable
from trustplane.protocol.form import Form
from trustplane.protocol.tokens import IssuedToken
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings

DRAFT = "draft-ietf-oauth-transaction-tokens-10"
TOKEN_TYPE_TXN_TOKEN = "urn:ietf:params:oauth:token-type:txn_token"
TXN_TOKEN_TYP = "txntoken+jwt"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
MAX_PARAMETER = 4096

_TEXT = {"trade_id", "order_id", "allocation_id", "settlement_id", "instrument", "venue",
         "account", "action"}  # fmt: skip
_ENUMS = {
    "side": ("buy", "sell"),
    "approval": ("not_required", "pending", "approved", "rejected"),
    "origin": ("auto", "manual"),
}
_DETAIL_TYPES = ("trade_instruction", "settlement_instruction")
TCTX_MEMBERS = frozenset({"type", "quantity", "amount", *_TEXT, *_ENUMS})
RCTX_MEMBERS = frozenset({"req_ip", "authn"})


@dataclass(frozen=True, slots=True)
class TxnSubject:
    """What a Txn-Token is made from: the subject token (an access token or a Txn-Token)."""

    sub: str
    txn: str
    scopes: tuple[str, ...]
    exp: int
    tctx: dict[str, Any]
    rctx: dict[str, Any]
    req_wl: tuple[str, ...]
    details: tuple[dict[str, Any], ...]
    conditions: tuple[Condition, ...]
    subject_jti: str
    replacement: bool


class TxnTokenService:
    """Issues Txn-Tokens for :class:`~trustplane.oauth.exchange.grant.TokenExchangeGrant`."""

    def __init__(
        self,
        *,
        settings: Settings,
        keys: KeyService,
        subjects: SubjectTokens,
        details: AuthorizationDetailsRegistry,
    ) -> None:
        self.issuer = settings.issuer
        self.trust_domain = settings.trust_domain or settings.issuer
        self._lifetime, self._keys = settings.txn_token_lifetime, keys
        self._subjects, self._details = subjects, details

    async def handle(self, form: Form, client: Client) -> Granted:
        if not client.txn_token_requester:
            raise UnauthorizedClientError(
                "this client may not request Txn-Tokens: the operator grants that right "
                "(`trustplane clients add --txn-token-requester`)",
                reason_id="txn_token_requester",
            )
        if form.get("actor_token") is not None or form.get("exchange_mode") is not None:
            raise InvalidRequestError("a Txn-Token request takes no actor_token or exchange_mode")
        token, token_type = form.get("subject_token"), form.get("subject_token_type")
        if not token or not token_type:
            raise InvalidRequestError("subject_token and subject_token_type are required")
        self._check_audience(form)
        now = int(time.time())
        if token_type == TOKEN_TYPE_TXN_TOKEN:
            base = self._replaced(token, now)
        elif token_type == TOKEN_TYPE_ACCESS_TOKEN:
            base = await self._access(token, client, now)
        else:
            raise unacceptable(
                "a Txn-Token is issued for an access_token or replaces a txn_token",
                "subject_token_type",
            )
        scopes = _narrow_scopes(form.get("scope"), base.scopes)
        details = _object(form.get("request_details"), "request_details")
        if base.replacement:
            tctx = base.tctx if details is None else narrow_tctx(base.tctx, details)
            if form.get("request_context") is not None:
                raise InvalidRequestError("a replacement Txn-Token keeps the original rctx")
            rctx = base.rctx
        else:
            tctx = self._tctx(details, base.details)
            rctx = {**(_rctx(_object(form.get("request_context"), "request_context"))), **base.rctx}
        lifetime = min(self._lifetime, base.exp - now)
        if lifetime <= 0:
            raise unacceptable("the subject_token has expired", "expired")
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.trust_domain,
            "iat": now,
            "exp": now + lifetime,
            "jti": new_jti(),
            "txn": base.txn,
            "sub": base.sub,
            "scope": " ".join(scopes),
            "req_wl": client.client_id,
            **_chain(base.req_wl, client.client_id),
            "tctx": tctx,
            "rctx": rctx,
            "client_id": client.client_id,
        }
        signed = self._keys.ring.require_signer().with_typ(TXN_TOKEN_TYP).sign(claims)
        return Granted(
            token=IssuedToken(signed, claims, lifetime),
            response={"issued_token_type": TOKEN_TYPE_TXN_TOKEN, "token_type": "N_A"},
            details_digest=tctx.get("authorization_details_digest"),
            conditions=base.conditions,
            audit={
                "txn_token": {
                    "draft": DRAFT,
                    "replacement": base.replacement,
                    "subject_jti": base.subject_jti,
                    "tctx": tctx,
                }
            },
        )

    def _check_audience(self, form: Form) -> None:
        """§11.1: ``audience`` is REQUIRED and is the trust domain (``resource``, if sent, too)."""
        audiences = form.get_all("audience")
        if not audiences:
            raise InvalidRequestError("audience is required: the trust domain of the Txn-Token")
        if any(target != self.trust_domain for target in audiences + form.get_all("resource")):
            raise InvalidTargetError("a Txn-Token's audience is the trust domain: name it")

    async def _access(self, token: str, client: Client, now: int) -> TxnSubject:
        subject: Subject = await self._subjects.verify(token, TOKEN_TYPE_ACCESS_TOKEN, client, now)
        if subject.partner is not None:
            raise unacceptable(
                "a Txn-Token is issued only for this server's own access tokens", "partner_token"
            )
        txn = subject.claims.get("txn")
        rctx: dict[str, Any] = {"client_id": subject.claims.get("client_id")}
        if isinstance(subject.claims.get("lei"), str):
            rctx["lei"] = subject.claims["lei"]
        return TxnSubject(
            sub=subject.subject,
            txn=txn if isinstance(txn, str) and txn else new_jti(),
            scopes=subject.scopes,
            exp=subject.exp,
            tctx={},
            rctx=rctx,
            req_wl=(),
            details=tuple(subject.claims.get("authorization_details") or ()),
            conditions=(NotRevoked(subject.jti, revoked),),
            subject_jti=subject.jti,
            replacement=False,
        )

    def _replaced(self, token: str, now: int) -> TxnSubject:
        claims = read_txn_token(self._keys, token, issuer=self.issuer, audience=self.trust_domain)
        if claims is None or claims["exp"] <= now:
            raise unacceptable(
                "the subject_token is not a valid, unexpired Txn-Token of this trust domain",
                "invalid_txn_token",
            )
        chain = claims.get("req_wl_chain")
        return TxnSubject(
            sub=claims["sub"],
            txn=claims["txn"],
            scopes=tuple(str(claims.get("scope", "")).split()),
            exp=claims["exp"],
            tctx=dict(claims.get("tctx") or {}),
            rctx=dict(claims.get("rctx") or {}),
            req_wl=tuple(chain) if isinstance(chain, list) else (str(claims.get("req_wl")),),
            details=(),
            conditions=(),
            subject_jti=str(claims.get("jti")),
            replacement=True,
        )

    def _tctx(
        self, requested: dict[str, Any] | None, granted: tuple[dict[str, Any], ...]
    ) -> dict[str, Any]:
        digest = self._details.digest(granted)
        tctx: dict[str, Any] = {}
        if requested is not None:
            _check_members(requested)
            check_within(requested, granted)
            tctx.update(requested)
        if digest is not None:
            tctx["authorization_details_digest"] = digest
        return tctx


def read_txn_token(
    keys: KeyService, token: str, *, issuer: str, audience: str
) -> dict[str, Any] | None:
    """One of our Txn-Tokens with a valid signature, issuer and audience; None otherwise."""
    try:
        jws = parse(token)
        claims = jws.claims()
    except JWSError:
        return None
    if jws.header.get("typ") != TXN_TOKEN_TYP:
        return None
    entry = keys.ring.verify_keys.get(str(jws.header.get("kid")))
    if entry is None or entry[0] != jws.alg or not jws.verify(entry[1]):
        return None
    if claims.get("iss") != issuer or claims.get("aud") != audience:
        return None
    if not isinstance(claims.get("exp"), int) or not isinstance(claims.get("txn"), str):
        return None
    if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("scope"), str):
        return None
    return claims


def _object(raw: str | None, name: str) -> dict[str, Any] | None:
    """A draft §11.1 parameter: a JSON object, sent as JSON or base64url-encoded JSON."""
    if raw is None:
        return None
    if len(raw) > MAX_PARAMETER:
        raise InvalidRequestError(f"{name} is longer than {MAX_PARAMETER} characters")
    text = raw.strip()
    try:
        if not text.startswith("{"):
            text = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        value = orjson.loads(text)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidRequestError(f"{name} must be a (base64url-encoded) JSON object") from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{name} must be a (base64url-encoded) JSON object")
    return value


def _rctx(requested: dict[str, Any] | None) -> dict[str, Any]:
    if requested is None:
        return {}
    unknown = sorted(set(requested) - RCTX_MEMBERS)
    if unknown:
        raise InvalidRequestError(f"request_context member {unknown[0][:40]!r} is not supported")
    for name, value in requested.items():
        if not isinstance(value, str) or not 0 < len(value) <= 256:
            raise InvalidRequestError(f"request_context.{name} must be a short string")
    return requested


def _check_members(tctx: dict[str, Any]) -> None:
    unknown = sorted(set(tctx) - TCTX_MEMBERS)
    if unknown:
        raise InvalidRequestError(f"request_details member {unknown[0][:40]!r} is not supported")
    if tctx.get("type") not in _DETAIL_TYPES:
        raise InvalidRequestError(
            f"request_details.type must name the authorization_details type acted under: "
            f"{' or '.join(_DETAIL_TYPES)}"
        )
    if "action" not in tctx or "account" not in tctx:
        raise InvalidRequestError("request_details must name the action and the account")
    for name in _TEXT & set(tctx):
        if not isinstance(tctx[name], str) or not 0 < len(tctx[name]) <= 128:
            raise InvalidRequestError(f"request_details.{name} must be a short string")
    for name, allowed in _ENUMS.items():
        if name in tctx and tctx[name] not in allowed:
            raise InvalidRequestError(f"request_details.{name} must be one of {', '.join(allowed)}")
    quantity = tctx.get("quantity")
    if "quantity" in tctx and (not _positive(quantity)):
        raise InvalidRequestError("request_details.quantity must be a positive integer")
    if "amount" in tctx:
        amount = tctx["amount"]
        if (
            not isinstance(amount, dict)
            or set(amount) != {"amount", "currency", "minor_units"}
            or not _positive(amount["amount"])
            or not isinstance(amount["currency"], str)
            or not isinstance(amount["minor_units"], int)
        ):
            raise InvalidRequestError(
                "request_details.amount must be {amount, currency, minor_units}"
            )


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_within(tctx: dict[str, Any], granted: tuple[dict[str, Any], ...]) -> None:
    """The transaction must fall within one of the subject token's ``authorization_details``."""
    if not any(_within_one(tctx, detail) for detail in granted):
        raise InvalidRequestError(
            "request_details exceed the subject_token's authorization_details",
            reason_id="tctx_exceeds_authorization",
        )


def _within_one(tctx: dict[str, Any], detail: dict[str, Any]) -> bool:
    if detail.get("type") != tctx["type"]:
        return False
    pairs = (("action", "actions"), ("account", "accounts"), ("side", "sides"),
             ("instrument", "isins"), ("venue", "venues"))  # fmt: skip
    for member, limit in pairs:
        if member in tctx and limit in detail and tctx[member] not in detail[limit]:
            return False
    cap = detail.get("max_notional") or detail.get("max_amount")
    amount = tctx.get("amount")
    if amount is not None:
        if not isinstance(cap, dict):
            return False
        if (amount["currency"], amount["minor_units"]) != (
            cap.get("currency"),
            cap.get("minor_units"),
        ):
            return False
        if amount["amount"] > cap.get("amount", 0):
            return False
    return True


def narrow_tctx(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A replacement's ``tctx``: every member already in ``old``, equal or (quantity, amount)
    smaller; the digest is the old one. Anything wider is ``invalid_request``."""
    out = dict(old)
    for name, value in new.items():
        if name == "authorization_details_digest" or name not in old:
            raise _widened(name)
        before = old[name]
        if name == "quantity":
            if not _positive(value) or value > before:
                raise _widened(name)
        elif name == "amount":
            if (
                not isinstance(value, dict)
                or {k: v for k, v in value.items() if k != "amount"}
                != {k: v for k, v in before.items() if k != "amount"}
                or not _positive(value.get("amount"))
                or value["amount"] > before["amount"]
            ):
                raise _widened(name)
        elif value != before:
            raise _widened(name)
        out[name] = value
    return out


def _widened(name: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"a replacement Txn-Token can only narrow tctx: {name[:40]!r} differs from or widens the "
        "original",
        reason_id="tctx_widened",
    )


def _narrow_scopes(requested: str | None, held: tuple[str, ...]) -> tuple[str, ...]:
    """§11.1: ``scope`` is REQUIRED; §13.6: within the subject token's scopes (so a subject token
    without scopes allows none, §13.14)."""
    scopes = tuple(dict.fromkeys((requested or "").split()))
    if not scopes:
        raise InvalidScopeError("scope is required: the purpose of the transaction")
    wider = [s for s in scopes if s not in held]
    if wider:
        raise InvalidScopeError(
            f"scope {wider[0][:80]!r} is not in the subject_token: a Txn-Token only narrows"
        )
    return scopes


def _chain(previous: tuple[str, ...], client_id: str) -> dict[str, list[str]]:
    """On a replacement, ``req_wl_chain``: the workloads that requested each token of the chain,
    oldest first, ending with this requester (``req_wl`` itself stays a string, §9.2)."""
    return {"req_wl_chain": [*previous, client_id]} if previous else {}
