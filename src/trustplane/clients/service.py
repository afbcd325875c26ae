"""Client registration and management, and the in-memory registry the hot path reads.

The registry is a dict swapped whole on reload: a write in this process reloads at once; other
processes notice the bumped generation within ``cache_refresh_interval`` seconds.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection
from stdnum import lei as stdnum_lei

from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.clients.metadata import SECRET_METHODS, validate_metadata
from trustplane.clients.model import Client, ClientStatus, hash_secret, new_secret, secret_matches
from trustplane.clients.store import (
    TOKEN_ID_LENGTH,
    ClientStore,
    InitialAccessTokenInfo,
    SqlInitialAccessTokenStore,
)
from trustplane.errors import (
    AccessDeniedError,
    InvalidClientMetadataError,
    InvalidTokenError,
    OAuth2Error,
)
from trustplane.protocol.scopes import Vocabulary
from trustplane.settings import Settings
from trustplane.storage import generations
from trustplane.storage.db import Database

GENERATION = "clients"
#: ``registration-token list``'s id of a token: its hash's first hex digits (clients/store.py).
TOKEN_ID = re.compile(f"[0-9a-f]{{{TOKEN_ID_LENGTH}}}")

#: ``initial_access_tokens.description`` is VARCHAR(200) (PostgreSQL refuses longer, SQLite not).
DESCRIPTION_MAX = 200
AuditWriter = Callable[[AsyncConnection, list[AuditEvent]], Awaitable[object]]


class ClientNotFoundError(LookupError):
    """No client with that id."""


def _storable_id(client_id: str) -> bool:
    """Could be a stored client_id (``clients.client_id`` is VARCHAR(128); PostgreSQL refuses a
    NUL outright): anything else is unknown without a query."""
    return len(client_id) <= 128 and client_id.isprintable()


def _management_refusal(client: Client | None) -> OAuth2Error:
    """RFC 7592 §2.1-§2.3: 401 for a token that is not this client's or a client that does not
    exist; 403 for a client that exists but may not change its registration (operator-disabled)."""
    if client is not None and not client.active:
        return AccessDeniedError(
            "the client is disabled by the operator: its registration cannot be changed"
        )
    return InvalidTokenError("the registration access token is not valid for this client")


@dataclass(frozen=True, slots=True)
class Registration:
    """What registration hands back once: the client plus its one-time-visible credentials."""

    client: Client
    client_secret: str | None
    registration_access_token: str | None


class ClientRegistry:
    """Read-only view for the hot path: ``get`` is a dict lookup."""

    def __init__(self) -> None:
        self._by_id: dict[str, Client] = {}

    def get(self, client_id: str) -> Client | None:
        return self._by_id.get(client_id)

    def replace_all(self, clients: list[Client]) -> None:
        self._by_id = {c.client_id: c for c in clients}

    def __len__(self) -> int:
        return len(self._by_id)


class ClientService:
    def __init__(
        self,
        db: Database,
        store: ClientStore,
        tokens: SqlInitialAccessTokenStore,
        settings: Settings,
        vocabulary: Vocabulary,
        audit_writer: AuditWriter,
    ) -> None:
        self._db, self._store, self._tokens = db, store, tokens
        self._settings, self._vocabulary, self._audit = settings, vocabulary, audit_writer
        self.registry = ClientRegistry()

    async def load(self) -> None:
        async with self._db.read() as conn:
            self.registry.replace_all(await self._store.list(conn))

    async def list(self) -> list[Client]:
        async with self._db.read() as conn:
            return await self._store.list(conn)

    async def get(self, client_id: str) -> Client:
        async with self._db.read() as conn:
            client = await self._store.get(conn, client_id)
        if client is None:
            raise ClientNotFoundError(client_id)
        return client

    async def create_initial_access_token(
        self,
        description: str,
        ttl: int | None = None,
        max_uses: int | None = None,
        *,
        lei: str | None = None,
        any_lei: bool = False,
    ) -> str:
        """RFC 7591 §3: the bearer token that protects the registration endpoint. It registers
        clients of legal entity ``lei`` only: the LEI is what policies and mandates compare, and
        rights come from the operator, never from what a client writes in its own registration.
        ``any_lei=True`` instead: the operator's explicit choice of a token whose holder may
        register a client of any legal entity. Exactly one of the two (else ``ValueError``)."""
        if (lei is None) != any_lei:
            raise ValueError(
                "name the legal entity the token registers (--lei LEI), or pass --any-lei for a "
                "token that registers any legal entity"
                if lei is None
                else "--lei and --any-lei exclude each other"
            )
        if lei is not None and not (stdnum_lei.is_valid(lei) and lei == stdnum_lei.compact(lei)):
            raise ValueError(f"--lei: not a canonical ISO 17442 LEI: {lei[:40]!r}")
        if not 0 < len(description) <= DESCRIPTION_MAX or not description.isprintable():
            raise ValueError(f"--description: 1 to {DESCRIPTION_MAX} printable characters")
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        expires = now + (ttl or self._settings.initial_access_token_lifetime)
        async with self._db.transaction() as conn:
            await self._tokens.add(
                conn, hash_secret(token), description, now, expires, max_uses, lei=lei
            )
            bound: dict[str, Any] = {"lei": lei} if lei else {"any_lei": True}
            event = self._event(
                AuditEventType.REGISTRATION_TOKEN_CREATED, None, description=description, **bound
            )
            await self._audit(conn, [event])
        return token

    async def initial_access_tokens(self) -> Sequence[InitialAccessTokenInfo]:
        """Every stored initial access token, newest first, as ``registration-token list`` shows
        them (ids, never the tokens: only their hashes are stored)."""
        async with self._db.read() as conn:
            return await self._tokens.all(conn)

    async def revoke_initial_access_token(self, id_: str) -> InitialAccessTokenInfo:
        """Revoke the initial access token named ``id_`` (``registration-token list``'s id): it
        registers nothing from now on; the clients it registered stay (disable them apart). One
        audit event, in the same transaction. ``ValueError``: not an id; ``LookupError``: no such
        token, or it is revoked already (nothing written)."""
        if not TOKEN_ID.fullmatch(id_):
            raise ValueError(
                f"not a token id ({TOKEN_ID_LENGTH} lowercase hex digits): {id_[:40]!r}"
            )
        async with self._db.transaction() as conn:
            revoked = await self._tokens.revoke(conn, id_, int(time.time()))
            if revoked is None:
                raise LookupError(f"no initial access token {id_} that is not revoked already")
            bound: dict[str, Any] = {"lei": revoked.lei} if revoked.lei else {}
            event = self._event(
                AuditEventType.REGISTRATION_TOKEN_REVOKED,
                None,
                token_id=id_,
                description=revoked.description,
                uses=revoked.uses,
                **bound,
            )
            await self._audit(conn, [event])
        return revoked

    async def register(
        self, raw: Any, *, initial_access_token: str | None, issue_registration_token: bool = True
    ) -> Registration:
        """RFC 7591 §3.1. ``initial_access_token`` None means a trusted caller (the CLI).

        The token is checked before the metadata, so an unauthenticated caller learns nothing about
        the validation rules; it is consumed only in the transaction that stores the client."""
        now = int(time.time())
        usable = None
        if initial_access_token is not None:
            async with self._db.read() as conn:
                usable = await self._tokens.usable(conn, hash_secret(initial_access_token), now)
            if usable is None:
                raise InvalidTokenError("the initial access token is invalid, expired or used up")
            if usable.lei is not None and isinstance(raw, dict) and "lei" not in raw:
                raw = {**raw, "lei": usable.lei}  # RFC 7591 §3.2.1: a value the server provisions
        metadata = validate_metadata(
            raw, self._settings, self._vocabulary, operator=initial_access_token is None
        )
        if usable is not None and usable.lei is not None and metadata["lei"] != usable.lei:
            raise InvalidClientMetadataError(
                "lei: this initial access token registers clients of another legal entity only"
            )
        secret = new_secret() if metadata["token_endpoint_auth_method"] in SECRET_METHODS else None
        rat = secrets.token_urlsafe(32) if issue_registration_token else None
        client = Client.build(
            "tp-" + secrets.token_urlsafe(16),
            metadata,
            ClientStatus.ACTIVE,
            secret_hash=hash_secret(secret) if secret else None,
            registration_token_hash=hash_secret(rat) if rat else None,
            created_at=now,
            updated_at=now,
        )
        async with self._db.transaction() as conn:
            if initial_access_token is not None and not await self._tokens.use(
                conn, hash_secret(initial_access_token), now
            ):
                raise InvalidTokenError("the initial access token is invalid, expired or used up")
            await self._store.add(conn, client)
            await generations.bump(conn, GENERATION)
            await self._audit(conn, [self._event(AuditEventType.CLIENT_REGISTERED, client)])
        await self.load()
        return Registration(client, secret, rat)

    async def check_initial_access_token(self, token: str) -> None:
        """Raise ``InvalidTokenError`` unless ``token`` is usable now (not consumed: :meth:`register`
        consumes it). Lets the endpoint refuse before it reads the request body."""
        async with self._db.read() as conn:
            if not await self._tokens.usable(conn, hash_secret(token), int(time.time())):
                raise InvalidTokenError("the initial access token is invalid, expired or used up")

    async def authorize_management(
        self, client_id: str, registration_token: str, *, change: bool = False
    ) -> Client:
        """RFC 7592 §2: the registration access token must be this client's; anything else, an
        unknown or a deleted client included, is 401 ``invalid_token`` (§2.1-§2.3). The client is
        read from the database, not the registry: a client another process (the CLI, another
        worker) deleted or disabled is seen at once. ``change``: a client the operator disabled may
        read its registration but not change or delete it (403, §2.2, §2.3)."""
        client = await self._get_or_none(client_id) if _storable_id(client_id) else None
        if client is None or not secret_matches(registration_token, client.registration_token_hash):
            raise _management_refusal(None)
        if change and not client.active:
            raise _management_refusal(client)
        return client

    async def update(self, client: Client, raw: Any) -> Client:
        """RFC 7592 §2.2: full replacement of the metadata; the body must name the same client.

        The write is conditional on the token and the status read by :meth:`authorize_management`
        (one statement, :meth:`ClientStore.replace_metadata`): a client deleted, disabled or given
        another token meanwhile is refused as such, and the status is never written back."""
        metadata = self._replacement(client, raw)
        updated = Client.build(
            client.client_id,
            metadata,
            client.status,
            secret_hash=client.secret_hash,
            registration_token_hash=client.registration_token_hash,
            created_at=client.created_at,
            updated_at=int(time.time()),
        )
        async with self._db.transaction() as conn:
            if not await self._store.replace_metadata(
                conn,
                client.client_id,
                updated.metadata,
                updated.updated_at,
                registration_token_hash=client.registration_token_hash or "",
            ):
                raise _management_refusal(await self._store.get(conn, client.client_id))
            await generations.bump(conn, GENERATION)
            await self._audit(conn, [self._event(AuditEventType.CLIENT_UPDATED, updated)])
        await self.load()
        return updated

    def _replacement(self, client: Client, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict) or raw.get("client_id") != client.client_id:
            raise InvalidClientMetadataError("client_id in the body must match the client")
        forbidden = {
            "registration_access_token",
            "registration_client_uri",
            "client_secret_expires_at",
            "client_id_issued_at",
        } & raw.keys()
        if forbidden:
            raise InvalidClientMetadataError(f"must not be sent: {', '.join(sorted(forbidden))}")
        secret_sent = raw.get("client_secret")
        if secret_sent is not None and not secret_matches(str(secret_sent), client.secret_hash):
            raise InvalidClientMetadataError("client_secret does not match")
        metadata = validate_metadata(raw, self._settings, self._vocabulary)
        if metadata["token_endpoint_auth_method"] != client.auth_method:
            raise InvalidClientMetadataError(
                "token_endpoint_auth_method cannot be changed; register anew"
            )
        if metadata["lei"] != client.lei:  # consents and mandates name the client's legal entity
            raise InvalidClientMetadataError("lei cannot be changed; register anew")
        return metadata

    async def set_status(self, client_id: str, status: ClientStatus) -> Client:
        """The operator's enable/disable: writes the status alone, so an RFC 7592 update committed
        meanwhile is kept (a whole-row write of what was read before it would revert it)."""
        event = (
            AuditEventType.CLIENT_DISABLED
            if status is ClientStatus.DISABLED
            else AuditEventType.CLIENT_UPDATED
        )
        async with self._db.transaction() as conn:
            if not await self._store.set_status(conn, client_id, status, int(time.time())):
                raise ClientNotFoundError(client_id)
            updated = await self._store.get(conn, client_id)
            if updated is None:  # cannot happen: the row was just updated in this transaction
                raise ClientNotFoundError(client_id)
            await generations.bump(conn, GENERATION)
            await self._audit(conn, [self._event(event, updated)])
        await self.load()
        return updated

    async def delete(self, client_id: str) -> None:
        async with self._db.transaction() as conn:
            client = await self._store.get(conn, client_id)
            if client is None or not await self._store.delete(conn, client_id):
                raise ClientNotFoundError(client_id)
            await generations.bump(conn, GENERATION)
            await self._audit(conn, [self._event(AuditEventType.CLIENT_DELETED, client)])
        await self.load()

    async def deregister(self, client: Client) -> None:
        """RFC 7592 §2.3, conditional like :meth:`update`: of two racing deletes one removes the
        client and the other is answered as for an unknown client (401)."""
        async with self._db.transaction() as conn:
            if not await self._store.delete(
                conn, client.client_id, registration_token_hash=client.registration_token_hash or ""
            ):
                raise _management_refusal(await self._store.get(conn, client.client_id))
            await generations.bump(conn, GENERATION)
            await self._audit(conn, [self._event(AuditEventType.CLIENT_DELETED, client)])
        await self.load()

    async def _get_or_none(self, client_id: str) -> Client | None:
        async with self._db.read() as conn:
            return await self._store.get(conn, client_id)

    def _event(self, type_: AuditEventType, client: Client | None, **payload: Any) -> AuditEvent:
        return AuditEvent(
            type=type_,
            issuer=self._settings.issuer,
            client_id=client.client_id if client else None,
            subject=client.client_id if client else None,
            scopes=tuple(sorted(client.scopes)) if client else (),
            service="trustplane.clients",
            payload={"lei": client.lei, "status": client.status.value, **payload}
            if client
            else payload,
        )
