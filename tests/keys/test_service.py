"""KeyService lifecycle on SQLite and PostgreSQL: next -> active -> retired -> removed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, update

from tests.conftest import make_settings, truncate_all
from trustplane.app import Services
from trustplane.audit.sink import recent_events
from trustplane.jose.jwk import PRIVATE_MEMBERS, thumbprint
from trustplane.keys import service as key_service
from trustplane.keys.crypto import (
    KeyDecryptionError,
    decrypt_private_key,
    new_kek_text,
    public_jwk,
)
from trustplane.keys.store import KeyState, StoredKey
from trustplane.keys.tables import signing_keys
from trustplane.protocol.tokens import issue_access_token, read_access_token
from trustplane.settings import MAX_ACCESS_TOKEN_LIFETIME, Settings, decode_kek

T0 = 1_900_000_000
AUDIENCE = "https://execution.example/api"


class Clock:
    """Replaces the ``time`` module inside trustplane.keys.service only."""

    def __init__(self, now: int) -> None:
        self.now = now

    def time(self) -> float:
        return float(self.now)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(T0)
    monkeypatch.setattr(key_service, "time", fake)
    return fake


@asynccontextmanager
async def built(settings: Settings) -> AsyncIterator[Services]:
    """Services without start(): the test decides when keys are created."""
    svc = Services.build(settings)
    try:
        yield svc
    finally:
        await svc.db.dispose()


@pytest.fixture
async def svc(settings_factory: Callable[..., Settings], clock: Clock) -> AsyncIterator[Services]:
    async with built(settings_factory()) as services:
        await services.keys.ensure()
        yield services


def by_state(keys: list[StoredKey]) -> dict[KeyState, list[str]]:
    out: dict[KeyState, list[str]] = {}
    for key in keys:
        out.setdefault(key.state, []).append(key.kid)
    return out


def one(keys: list[StoredKey], state: KeyState) -> StoredKey:
    matching = [k for k in keys if k.state is state]
    assert len(matching) == 1, [(k.kid, k.state) for k in keys]
    return matching[0]


def jwks(svc: Services) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(svc.keys.ring.jwks_json)
    return result


def issue(svc: Services) -> str:
    return issue_access_token(
        svc.keys.ring,
        issuer=svc.settings.issuer,
        subject="client-1",
        client_id="client-1",
        audience=AUDIENCE,
        scopes=("order:create",),
        lifetime=300,
    ).token


# --------------------------------------------------------------------------- ensure / JWKS


async def test_ensure_creates_one_active_and_one_next_key(svc: Services) -> None:
    keys = await svc.keys.list_all()

    assert sorted(k.state.value for k in keys) == ["active", "next"]
    active, nxt = one(keys, KeyState.ACTIVE), one(keys, KeyState.NEXT)
    assert (active.alg, nxt.alg) == ("ES256", "ES256")
    assert active.kid == thumbprint(active.public_jwk)
    assert nxt.kid == thumbprint(nxt.public_jwk)
    assert (active.created_at, active.activated_at) == (T0, T0)
    assert (nxt.created_at, nxt.activated_at) == (T0, None)
    assert svc.keys.ring.require_signer().kid == active.kid
    created = await recent_events(svc.db, type_="keys:key:created")
    assert sorted(e["payload"]["kid"] for e in created) == sorted([active.kid, nxt.kid])


async def test_ensure_is_idempotent(svc: Services) -> None:
    before = await svc.keys.list_all()

    assert await svc.keys.ensure() is False
    assert await svc.keys.ensure() is False
    assert await svc.keys.list_all() == before
    assert len(await recent_events(svc.db, type_="keys:key:created")) == 2


async def test_first_ensure_reports_creation(
    settings_factory: Callable[..., Settings], clock: Clock
) -> None:
    async with built(settings_factory()) as services:
        assert services.keys.ring.signer is None
        assert await services.keys.ensure() is True
        assert services.keys.ring.signer is not None


async def test_jwks_publishes_next_and_active_keys_without_private_members(svc: Services) -> None:
    keys = await svc.keys.list_all()
    published = jwks(svc)["keys"]

    assert sorted(k["kid"] for k in published) == sorted(k.kid for k in keys)
    for jwk in published:
        assert PRIVATE_MEMBERS.isdisjoint(jwk), jwk
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
        assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}


async def test_jwks_includes_the_retired_key_after_rotation(svc: Services) -> None:
    await svc.keys.rotate()
    keys = await svc.keys.list_all()
    published = {k["kid"] for k in jwks(svc)["keys"]}

    assert sorted(k.state.value for k in keys) == ["active", "next", "retired"]
    assert published == {k.kid for k in keys}
    assert all(PRIVATE_MEMBERS.isdisjoint(k) for k in jwks(svc)["keys"])


# --------------------------------------------------------------------------- rotate / prune


@pytest.mark.parametrize("skew", [60, 17])
async def test_rotate_moves_next_to_active_and_active_to_retired(
    settings_factory: Callable[..., Settings], clock: Clock, skew: int
) -> None:
    async with built(settings_factory(clock_skew=skew)) as svc:
        await svc.keys.ensure()
        before = await svc.keys.list_all()
        old_active, old_next = one(before, KeyState.ACTIVE), one(before, KeyState.NEXT)
        clock.now = T0 + 1000

        new_active_kid = await svc.keys.rotate(reason="test")

        after = {k.kid: k for k in await svc.keys.list_all()}
        assert new_active_kid == old_next.kid
        retired = after[old_active.kid]
        assert retired.state is KeyState.RETIRED
        assert retired.retired_at == T0 + 1000
        assert retired.remove_after == T0 + 1000 + MAX_ACCESS_TOKEN_LIFETIME + skew
        assert MAX_ACCESS_TOKEN_LIFETIME == 900
        activated = after[old_next.kid]
        assert (activated.state, activated.activated_at) == (KeyState.ACTIVE, T0 + 1000)
        fresh = one(list(after.values()), KeyState.NEXT)
        assert fresh.kid not in (old_active.kid, old_next.kid)
        assert fresh.created_at == T0 + 1000
        assert svc.keys.ring.require_signer().kid == old_next.kid
        activated_events = await recent_events(svc.db, type_="keys:key:activated")
        assert [(e["payload"]["kid"], e["payload"]["reason"]) for e in activated_events] == [
            (old_next.kid, "test")
        ]


async def test_rotate_without_a_published_next_key_creates_one(svc: Services) -> None:
    nxt = one(await svc.keys.list_all(), KeyState.NEXT)
    async with svc.db.transaction() as conn:
        await conn.execute(signing_keys.delete().where(signing_keys.c.kid == nxt.kid))

    kid = await svc.keys.rotate(reason="emergency")

    states = by_state(await svc.keys.list_all())
    assert kid != nxt.kid
    assert states[KeyState.ACTIVE] == [kid]
    assert len(states[KeyState.NEXT]) == 1
    assert len(states[KeyState.RETIRED]) == 1


async def test_token_signed_before_rotation_still_verifies(svc: Services) -> None:
    old_kid = svc.keys.ring.require_signer().kid
    token = issue(svc)

    await svc.keys.rotate()

    claims = read_access_token(svc.keys.ring, token, issuer=svc.settings.issuer)
    assert claims is not None
    assert (claims["sub"], claims["aud"]) == ("client-1", AUDIENCE)
    assert jwt.get_unverified_header(token)["kid"] == old_kid
    new_token = issue(svc)
    assert jwt.get_unverified_header(new_token)["kid"] != old_kid
    assert read_access_token(svc.keys.ring, new_token, issuer=svc.settings.issuer) is not None


async def test_prune_removes_retired_keys_only_once_remove_after_has_passed(
    svc: Services, clock: Clock
) -> None:
    token = issue(svc)
    await svc.keys.rotate()
    retired = one(await svc.keys.list_all(), KeyState.RETIRED)
    assert retired.remove_after is not None

    clock.now = retired.remove_after - 1
    assert await svc.keys.prune() == []
    assert retired.kid in {k["kid"] for k in jwks(svc)["keys"]}

    clock.now = retired.remove_after
    assert await svc.keys.prune() == [retired.kid]

    assert retired.kid not in {k["kid"] for k in jwks(svc)["keys"]}
    assert retired.kid not in svc.keys.ring.verify_keys
    assert read_access_token(svc.keys.ring, token, issuer=svc.settings.issuer) is None
    removed = next(k for k in await svc.keys.list_all() if k.kid == retired.kid)
    assert (removed.state, removed.private_key) == (KeyState.REMOVED, None)
    assert retired.kid not in {k.kid for k in (await svc.keys.load()).keys}
    assert await svc.keys.prune() == []
    events = await recent_events(svc.db, type_="keys:key:removed")
    assert [e["payload"]["kid"] for e in events] == [retired.kid]


async def test_prune_keeps_active_and_next_keys(svc: Services, clock: Clock) -> None:
    clock.now = T0 + 10 * 365 * 86400

    assert await svc.keys.prune() == []
    assert sorted(k.state.value for k in await svc.keys.list_all()) == ["active", "next"]


# --------------------------------------------------------------------------- encryption at rest


async def _blobs(svc: Services) -> dict[str, bytes]:
    async with svc.db.read() as conn:
        rows = await conn.execute(select(signing_keys.c.kid, signing_keys.c.private_key))
        return {kid: bytes(blob) for kid, blob in rows}


async def test_private_keys_are_encrypted_at_rest(svc: Services) -> None:
    kek = decode_kek(svc.settings.key_encryption_key.get_secret_value())  # type: ignore[union-attr]
    public = {k.kid: k.public_jwk for k in await svc.keys.list_all()}
    blobs = await _blobs(svc)

    assert blobs.keys() == public.keys()
    for kid, blob in blobs.items():
        private = decrypt_private_key(blob, kek, kid)
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        scalar = private.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
        assert der not in blob
        assert scalar not in blob
        assert len(blob) == 12 + len(der) + 16  # nonce || ciphertext || GCM tag
        assert public_jwk(private) == public[kid]


async def test_wrong_kek_cannot_decrypt(
    svc: Services, db_url: str, tmp_path: Path, clock: Clock
) -> None:
    blobs = await _blobs(svc)
    other = decode_kek(new_kek_text())

    for kid, blob in blobs.items():
        with pytest.raises(KeyDecryptionError, match=rf"^cannot decrypt signing key {kid}: "):
            decrypt_private_key(blob, other, kid)
    async with built(make_settings(db_url, tmp_path, key_encryption_key=new_kek_text())) as wrong:
        with pytest.raises(KeyDecryptionError):
            await wrong.keys.load()


async def test_swapped_ciphertexts_do_not_decrypt(svc: Services) -> None:
    """The kid is the associated data: a row's ciphertext cannot be moved to another row."""
    keys = await svc.keys.list_all()
    active, nxt = one(keys, KeyState.ACTIVE), one(keys, KeyState.NEXT)
    blobs = await _blobs(svc)
    async with svc.db.transaction() as conn:
        for kid, blob in ((active.kid, blobs[nxt.kid]), (nxt.kid, blobs[active.kid])):
            await conn.execute(
                update(signing_keys).where(signing_keys.c.kid == kid).values(private_key=blob)
            )

    with pytest.raises(KeyDecryptionError, match=rf"^cannot decrypt signing key {active.kid}: "):
        await svc.keys.load()
    kek = decode_kek(svc.settings.key_encryption_key.get_secret_value())  # type: ignore[union-attr]
    with pytest.raises(KeyDecryptionError):
        decrypt_private_key(blobs[nxt.kid], kek, active.kid)


async def test_tampered_ciphertext_does_not_decrypt(svc: Services) -> None:
    kek = decode_kek(svc.settings.key_encryption_key.get_secret_value())  # type: ignore[union-attr]
    kid, blob = next(iter((await _blobs(svc)).items()))
    tampered = blob[:20] + bytes([blob[20] ^ 1]) + blob[21:]

    with pytest.raises(KeyDecryptionError):
        decrypt_private_key(tampered, kek, kid)


# --------------------------------------------------------------------------- scheduled rotation


async def test_maybe_rotate_is_off_when_the_interval_is_zero(svc: Services, clock: Clock) -> None:
    assert svc.settings.key_rotation_interval == 0
    clock.now = T0 + 10 * 365 * 86400

    assert await svc.keys.maybe_rotate() is None
    assert sorted(k.state.value for k in await svc.keys.list_all()) == ["active", "next"]


async def test_maybe_rotate_respects_interval_and_next_publication(
    settings_factory: Callable[..., Settings], clock: Clock
) -> None:
    settings = settings_factory(key_rotation_interval=3600, key_next_publication=7200)
    async with built(settings) as svc:
        await svc.keys.ensure()
        first = one(await svc.keys.list_all(), KeyState.ACTIVE)
        nxt = one(await svc.keys.list_all(), KeyState.NEXT)

        clock.now = T0 + 3599  # active key not old enough
        assert await svc.keys.maybe_rotate() is None
        clock.now = T0 + 3600  # old enough, but the next key is published for only 3600 s
        assert await svc.keys.maybe_rotate() is None
        clock.now = T0 + 7199
        assert await svc.keys.maybe_rotate() is None
        assert one(await svc.keys.list_all(), KeyState.ACTIVE).kid == first.kid

        clock.now = T0 + 7200
        assert await svc.keys.maybe_rotate() == nxt.kid
        keys = await svc.keys.list_all()
        assert one(keys, KeyState.RETIRED).kid == first.kid
        assert one(keys, KeyState.ACTIVE).kid == nxt.kid
        events = await recent_events(svc.db, type_="keys:key:activated")
        assert events[0]["payload"]["reason"] == "schedule"

        clock.now = T0 + 7200 + 3599  # the new active key starts its own interval
        assert await svc.keys.maybe_rotate() is None


# --------------------------------------------------------------------------- algorithms


@pytest.mark.parametrize(("alg", "kty"), [("EdDSA", "OKP"), ("PS256", "RSA")])
async def test_other_signing_algorithms(
    settings_factory: Callable[..., Settings], alg: str, kty: str
) -> None:
    async with built(settings_factory(signing_algorithm=alg)) as svc:
        await svc.keys.ensure()
        token = issue(svc)

        header = jwt.get_unverified_header(token)
        published = {k["kid"]: k for k in jwks(svc)["keys"]}
        jwk = published[header["kid"]]
        assert (header["alg"], header["typ"]) == (alg, "at+jwt")
        assert (jwk["kty"], jwk["alg"], jwk["use"]) == (kty, alg, "sig")
        assert all(PRIVATE_MEMBERS.isdisjoint(k) for k in published.values())
        claims = jwt.decode(
            token,
            jwt.PyJWK(jwk).key,
            algorithms=[alg],
            audience=AUDIENCE,
            issuer=svc.settings.issuer,
        )
        assert claims["client_id"] == "client-1"
        assert read_access_token(svc.keys.ring, token, issuer=svc.settings.issuer) is not None
        kid = await svc.keys.rotate()
        assert svc.keys.ring.require_signer().alg == alg
        assert svc.keys.ring.require_signer().kid == kid


# --------------------------------------------------------------------------- races (PostgreSQL)


@pytest.mark.postgres
async def test_racing_ensure_from_two_processes_creates_one_active_key(
    pg_url: str, tmp_path: Path
) -> None:
    for _ in range(3):
        await truncate_all(pg_url)
        async with (
            built(make_settings(pg_url, tmp_path)) as a,
            built(make_settings(pg_url, tmp_path)) as b,
        ):
            created = await asyncio.gather(a.keys.ensure(), b.keys.ensure())

            assert sorted(created) == [False, True]
            keys = await a.keys.list_all()
            assert sorted(k.state.value for k in keys) == ["active", "next"]
            await a.keys.load()
            await b.keys.load()
            assert a.keys.ring.require_signer().kid == b.keys.ring.require_signer().kid


@pytest.mark.postgres
async def test_racing_rotations_never_leave_two_active_keys(pg_url: str, tmp_path: Path) -> None:
    async with (
        built(make_settings(pg_url, tmp_path)) as a,
        built(make_settings(pg_url, tmp_path)) as b,
    ):
        await a.keys.ensure()
        for _ in range(3):
            results = await asyncio.gather(a.keys.rotate(), b.keys.rotate(), return_exceptions=True)

            rotated = [r for r in results if isinstance(r, str)]
            failed = [r for r in results if not isinstance(r, str)]
            assert all(
                isinstance(r, RuntimeError) and str(r) == "concurrent rotation detected"
                for r in failed
            ), failed
            assert len(set(rotated)) == len(rotated) >= 1
            states = by_state(await a.keys.list_all())
            assert len(states[KeyState.ACTIVE]) == 1
            assert len(states[KeyState.NEXT]) == 1
            assert states[KeyState.ACTIVE][0] in rotated
