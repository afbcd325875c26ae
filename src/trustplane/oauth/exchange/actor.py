"""Who acts in a token exchange (RFC 8693 §1.1, §2.1, §4.4): the ``actor_token``, or the
exchanging client itself, and the subject token's ``may_act``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trustplane.clients.model import Client
from trustplane.errors import InvalidRequestError
from trustplane.federation.profile import TOKEN_TYPE_ACCESS_TOKEN
from trustplane.keys.service import KeyService
from trustplane.oauth.exchange.subject import Subject, unacceptable
from trustplane.protocol.form import Form
from trustplane.protocol.revocations import RevocationStore
from trustplane.protocol.tokens import read_access_token
from trustplane.storage.db import Database


@dataclass(frozen=True, slots=True)
class Actor:
    sub: str
    iss: str
    client_id: str | None = None

    def claim(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sub": self.sub, "iss": self.iss}
        if self.client_id is not None:
            out["client_id"] = self.client_id
        return out


class ActorTokens:
    def __init__(
        self, *, issuer: str, keys: KeyService, db: Database, revocations: RevocationStore
    ) -> None:
        self._issuer, self._keys, self._db, self._revocations = issuer, keys, db, revocations

    async def actor(self, form: Form, client: Client, now: int) -> Actor:
        """Without an actor token the exchanging client is the actor (RFC 8693 §1.1 delegation);
        with one, it must be our live access token issued to the exchanging client."""
        token, token_type = form.get("actor_token"), form.get("actor_token_type")
        if token is None and token_type is None:
            return Actor(client.client_id, self._issuer, client.client_id)
        if not token or not token_type:
            raise InvalidRequestError(
                "actor_token_type is required with actor_token (and only then)"
            )
        if token_type != TOKEN_TYPE_ACCESS_TOKEN:
            raise unacceptable(
                "actor_token_type must be an access token of this server", "actor_type"
            )
        claims = read_access_token(self._keys.ring, token, issuer=self._issuer, now=now)
        if claims is None:
            raise unacceptable(
                "the actor_token is not a valid access token of this server", "actor_token"
            )
        if claims.get("client_id") != client.client_id:
            raise unacceptable(
                "the actor_token must have been issued to the exchanging client", "actor_client"
            )
        async with self._db.read() as conn:
            if await self._revocations.is_revoked(conn, str(claims["jti"])):
                raise unacceptable("the actor_token has been revoked", "actor_revoked")
        return Actor(str(claims["sub"]), self._issuer, client.client_id)


def check_may_act(subject: Subject, actor: Actor) -> None:
    """RFC 8693 §4.4: ``may_act`` names who may act for the subject; anyone else is refused."""
    may_act = subject.claims.get("may_act")
    if may_act is None:
        return
    allowed = isinstance(may_act, dict) and may_act.get("sub") == actor.sub
    if allowed and isinstance(may_act, dict) and "iss" in may_act:
        allowed = may_act["iss"] == actor.iss
    if not allowed:
        raise unacceptable(
            "the actor is not named in the subject_token's may_act",
            "may_act",
            f"actor {actor.sub[:100]} ({actor.iss[:100]})",
        )
