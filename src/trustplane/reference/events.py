"""Signed events: each outbox row is a compact JWS (ES256, ``typ: trade-event+jwt``) signed with the
service's key and verifiable from the service's JWKS (``GET /jwks``).

The payload: ``jti`` (the event id, also the JetStream ``Nats-Msg-Id``), ``iss`` (the service),
``iat``, ``type`` (``trade.executed`` ...), ``trade_id``, ``transition``, ``state`` and the
transaction ``envelope``: ``txn``, ``sub``, ``act`` (the actor chain, current actor first),
``mandate`` (``id`` + ``version``), ``authorization_details_digest`` (SHA-256 of the canonical
JSON), ``decision_ids``, ``policy_bundle_version``.

A consumer verifies with :func:`verify_event` (our JOSE, an allow-list of one algorithm, the key
chosen by ``kid`` from the publisher's JWKS): a tampered event is refused.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.events.formats import TRADE_EVENT_ALG as ALG
from trustplane.events.formats import TRADE_EVENT_TYP as EVENT_TYP
from trustplane.events.signed import verified_claims
from trustplane.ids import uuid7
from trustplane.jose.jwk import thumbprint
from trustplane.jose.jws import Signer, b64url_encode


class EventRefused(Exception):
    """An event whose signature, key or form does not verify: consumers never act on it."""


def digest(value: Any) -> str | None:
    """SHA-256 (base64url) of the canonical JSON of ``value`` (sorted keys); None for None."""
    if value is None:
        return None
    raw = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return b64url_encode(hashlib.sha256(raw).digest())


def actor_chain(claims: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``act`` flattened, current actor first (RFC 8693 §4.1: inner ``act`` members are history)."""
    chain: list[dict[str, Any]] = []
    node = claims.get("act")
    while isinstance(node, dict) and len(chain) < 8:
        chain.append({k: v for k, v in node.items() if k != "act"})
        node = node.get("act")
    return chain


@dataclass(frozen=True, slots=True)
class Envelope:
    """The transaction envelope every event carries."""

    txn: str | None
    sub: str | None
    client_id: str | None
    act: tuple[dict[str, Any], ...] = ()
    mandate: dict[str, Any] | None = None
    authorization_details_digest: str | None = None
    decision_ids: tuple[str, ...] = ()
    policy_bundle_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "txn": self.txn,
            "sub": self.sub,
            "client_id": self.client_id,
            "act": list(self.act),
            "mandate": self.mandate,
            "authorization_details_digest": self.authorization_details_digest,
            "decision_ids": list(self.decision_ids),
            "policy_bundle_version": self.policy_bundle_version,
        }

    @classmethod
    def from_claims(
        cls,
        claims: Mapping[str, Any],
        *,
        decision_ids: tuple[str, ...] = (),
        bundle_version: str | None = None,
    ) -> Envelope:
        """The envelope of a validated access token's claims and the PDP decisions taken on it."""
        txn, sub, client = claims.get("txn"), claims.get("sub"), claims.get("client_id")
        mandate = claims.get("mandate")
        return cls(
            txn=txn if isinstance(txn, str) else None,
            sub=sub if isinstance(sub, str) else None,
            client_id=client if isinstance(client, str) else None,
            act=tuple(actor_chain(claims)),
            mandate=dict(mandate) if isinstance(mandate, dict) else None,
            authorization_details_digest=digest(claims.get("authorization_details")),
            decision_ids=decision_ids,
            policy_bundle_version=bundle_version,
        )


@dataclass
class EventSigner:
    """The service's event key: ES256, ``kid`` = its RFC 7638 thumbprint."""

    issuer: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    kid: str = field(init=False)
    _signer: Signer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.kid = thumbprint(self.public_jwk(with_kid=False))
        self._signer = Signer(self.key, ALG, self.kid, EVENT_TYP)

    @classmethod
    def generate(cls, issuer: str) -> EventSigner:
        return cls(issuer, ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_file(cls, issuer: str, path: Path) -> EventSigner:
        """Load the PEM key at ``path``, creating it (mode 0600) on first start."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path} is not an EC P-256 private key")
            return cls(issuer, key)
        signer = cls.generate(issuer)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = signer.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.touch(mode=0o600)
        path.write_bytes(pem)
        return signer

    def public_jwk(self, *, with_kid: bool = True) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        jwk: dict[str, Any] = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big")),
        }
        if with_kid:
            jwk.update(kid=self.kid, alg=ALG, use="sig")
        return jwk

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk()]}

    def sign(
        self,
        event_type: str,
        trade_id: str,
        transition: str,
        state: str,
        envelope: Envelope,
        data: Mapping[str, Any] | None = None,
        *,
        now: float | None = None,
        source: str | None = None,
        acting: Mapping[str, Any] | None = None,
    ) -> tuple[str, str]:
        """A new event: (event id, compact JWS). ``source``: the state the trade left (``from``;
        None for ``create``), which a downstream store's compare-and-set needs to learn the event;
        ``acting``: the acting token's ``iss``, ``jti`` and mandate id, what the trade rests on
        (a downstream settlement store finds the trades in flight by it on a revocation)."""
        event_id = uuid7()  # time-ordered: the stores' unique indexes grow at their right edge
        payload = {
            "jti": event_id,
            "iss": self.issuer,
            "iat": int(now if now is not None else time.time()),
            "type": event_type,
            "trade_id": trade_id,
            "transition": transition,
            "state": state,
            "envelope": envelope.as_dict(),
            "data": dict(data or {}),
        }
        if source is not None:
            payload["from"] = source
        if acting:
            payload["acting"] = dict(acting)
        return event_id, self._signer.sign(payload)


def verify_event(compact: str, jwks: Any, *, issuer: str) -> dict[str, Any]:
    """The payload of a verified event, or :class:`EventRefused`: ES256 only, ``typ`` must be
    ``trade-event+jwt``, the key is the JWKS entry named by ``kid``, ``iss`` must be ``issuer``."""
    claims = verified_claims(compact, jwks, typ=EVENT_TYP, alg=ALG, refused=EventRefused)
    if claims.get("iss") != issuer or not isinstance(claims.get("jti"), str):
        raise EventRefused("wrong issuer or no event id")
    return claims
