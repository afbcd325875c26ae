"""The client as the rest of the server sees it: validated metadata plus parsed keys.

``resource_server_for`` is the one operator-granted right over other clients' tokens: the audiences
this client is the resource server for (it may introspect tokens addressed there, RFC 7662, and
exchange them, RFC 8693). Rows stored before that notion existed may carry the self-declarable
``introspection_resources``; :meth:`Client.build` keeps it as ``resource_server_for`` only for a
client the operator registered (``trustplane clients add`` never issues a registration access
token; RFC 7591 registration always does) and drops it for every other client.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from trustplane.jose.jwk import PublicKey, import_public_jwks


class ClientStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


def new_secret() -> str:
    """256 bits from the OS CSPRNG, base64url."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Secrets are 256-bit random values, so a plain SHA-256 is a sufficient one-way hash."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str | None) -> bool:
    """Constant-time comparison of hashes (never of the secrets themselves)."""
    candidate = hash_secret(secret)
    return stored_hash is not None and hmac.compare_digest(candidate, stored_hash)


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    metadata: dict[str, Any]
    status: ClientStatus
    secret_hash: str | None = None
    registration_token_hash: str | None = None
    created_at: int = 0
    updated_at: int = 0
    keys: tuple[tuple[str | None, str, PublicKey], ...] = field(default=(), compare=False)

    @classmethod
    def build(
        cls, client_id: str, metadata: dict[str, Any], status: ClientStatus, **kw: Any
    ) -> Client:
        jwks = metadata.get("jwks")
        keys = tuple(import_public_jwks(jwks)) if jwks else ()
        metadata = _without_legacy_rights(
            metadata, operator=kw.get("registration_token_hash") is None
        )
        return cls(client_id=client_id, metadata=metadata, status=status, keys=keys, **kw)

    @property
    def active(self) -> bool:
        return self.status is ClientStatus.ACTIVE

    @property
    def auth_method(self) -> str:
        return str(self.metadata["token_endpoint_auth_method"])

    @property
    def lei(self) -> str:
        return str(self.metadata["lei"])

    @property
    def grant_types(self) -> frozenset[str]:
        return frozenset(self.metadata.get("grant_types", ()))

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(str(self.metadata.get("scope", "")).split())

    @property
    def allowed_resources(self) -> tuple[str, ...]:
        return tuple(self.metadata.get("allowed_resources", ()))

    @property
    def resource_server_for(self) -> frozenset[str]:
        """Audiences whose tokens this client may introspect and exchange as their resource
        server: granted by the operator only (see the module docstring)."""
        return frozenset(self.metadata.get("resource_server_for", ()))

    @property
    def txn_token_requester(self) -> bool:
        """May request Transaction Tokens (oauth.exchange.txn_token): granted by the operator only."""
        return self.metadata.get("txn_token_requester") is True

    @property
    def jwks_uri(self) -> str | None:
        value = self.metadata.get("jwks_uri")
        return str(value) if value else None

    def public_metadata(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "client_id_issued_at": self.created_at,
            **self.metadata,
        }


def _without_legacy_rights(metadata: dict[str, Any], *, operator: bool) -> dict[str, Any]:
    """A stored ``introspection_resources`` (the self-declarable predecessor of
    ``resource_server_for``) becomes the operator's grant for an operator-registered client and is
    dropped for a dynamically registered one: a right a client wrote itself is never honoured."""
    legacy = metadata.get("introspection_resources")
    if legacy is None:
        return metadata
    out = {k: v for k, v in metadata.items() if k != "introspection_resources"}
    if operator and legacy:
        out["resource_server_for"] = list(
            dict.fromkeys([*out.get("resource_server_for", ()), *legacy])
        )
    return out
