"""The issuer's revocations raise exceptions on the trades in flight (issue 14 item 5): the store
records the token each transition was made with, a signal about a mandate or a token moves every
in-flight trade resting on it to ``exception`` (one exception per trade and SET, however often the
SET comes), and the SET verification refuses each malformed or foreign SET with its RFC 8935 code.
On SQLite and PostgreSQL; the live path (a real transmitter, the poll stream, the CLI receiver) is
tests/e2e/test_settlement_signals.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from tests.reference.conftest import ISSUER, ORDER, World, caller, fresh_store
from trustplane.jose.jwk import PublicKey
from trustplane.jose.jws import Signer
from trustplane.reference import machine
from trustplane.reference.services import Signal
from trustplane.reference.settings import ReferenceSettings, ReferenceSettingsError
from trustplane.reference.signals import (
    SetVerifier,
    configuration_url,
    issuer_of,
    signals_of,
)
from trustplane.reference.store import DuplicateTransition, OutOfOrder, TradeStore
from trustplane.ssf.receiver import SetRefused
from trustplane.ssf.transmitter import SESSION_REVOKED, TOKEN_CLAIMS_CHANGE, VERIFICATION
from trustplane.storage.db import Database

ALLOC = [{"account": "SUB-1", "quantity": "1000"}]
OTHER_ISSUER = "https://other.example"


def mandate_signal(jti: str = "set-1", mandate_id: str = "M-1", iss: str = ISSUER) -> Signal:
    return Signal(iss, jti, SESSION_REVOKED, "mandate_revoked", "revoked", mandate_id=mandate_id)


def token_signal(token_jti: str, jti: str = "set-2", iss: str = ISSUER) -> Signal:
    return Signal(iss, jti, SESSION_REVOKED, "token_revoked", "revoked", token_jti=token_jti)


async def trade_at(world: World, state: str, *, desk: str = "alice", **claims: Any) -> str:
    """A trade moved along the path up to ``state``; ``desk`` makes every step (its token is
    ``tok-<desk>``), except the approval (four eyes: ``approver-<desk>``)."""
    s, pdp = world.services, world.pdp
    trade = await s.create_order(caller(desk, pdp, **claims), ORDER, "k")
    steps = [
        lambda t: s.execute(caller(desk, pdp, **claims), t, "k"),
        lambda t: s.propose_allocation(caller(desk, pdp, **claims), t, ALLOC, "k"),
        lambda t: s.approve_allocation(caller(f"approver-{desk}", pdp, **claims), t, "k"),
        lambda t: s.submit_settlement(caller(desk, pdp, **claims), t, {"ssi": "X"}, "k"),
        lambda t: s.confirm_settlement(caller(desk, pdp, **claims), t, "settled", "k"),
    ]
    targets = [t.target for t in machine.PATH]
    for step, target in zip(steps, targets, strict=True):
        if (await world.store.trade(trade.trade_id)).state == state:
            break
        await step(trade.trade_id)
        assert (await world.store.trade(trade.trade_id)).state == target
    return trade.trade_id


async def exception_events(world: World, trade_id: str) -> list[dict[str, Any]]:
    key = jwt.PyJWK(world.store.signer.jwks()["keys"][0]).key
    return [
        jwt.decode(e.jws, key, algorithms=["ES256"])
        for e in await world.store.events_after(0, limit=10_000)
        if e.trade_id == trade_id and e.type == "settlement.exception"
    ]


async def test_a_revoked_mandate_moves_every_trade_in_flight_on_it_to_exception(
    world: World,
) -> None:
    in_flight = {state: await trade_at(world, state) for state in sorted(machine.IN_FLIGHT)}
    settled = await trade_at(world, machine.SETTLED)
    elsewhere = await trade_at(world, machine.EXECUTED, mandate={"id": "M-2", "version": 1})

    raised = await world.services.raise_on_signal(mandate_signal())

    assert sorted(r.trade_id for r in raised) == sorted(in_flight.values())
    for state, trade_id in in_flight.items():
        trade = await world.store.trade(trade_id)
        assert (trade.state, trade.exceptions) == (machine.EXCEPTION, 1)
        opened = await world.store.list_exceptions("open")
        (record,) = [e for e in opened if e.trade_id == trade_id]
        assert (record.from_state, record.reason) == (state, "mandate_revoked")
        (event,) = await exception_events(world, trade_id)
        assert event["transition"] == "exception#1"
        assert event["data"]["signal"] == {
            "iss": ISSUER, "jti": "set-1", "event_type": SESSION_REVOKED,
            "reason": "mandate_revoked", "token_jti": None, "mandate_id": "M-1",
        }  # fmt: skip
        assert event["data"]["exception"]["exception_id"] == f"{trade_id}.1"
        assert event["envelope"]["txn"] == "txn-1"
        history = await world.store.history(trade_id)
        assert history[-1].actor == f"ssf:{ISSUER}"
    assert (await world.store.trade(settled)).state == machine.SETTLED
    assert (await world.store.trade(elsewhere)).state == machine.EXECUTED


async def test_a_set_delivered_twice_raises_one_exception_even_after_a_reconsent(
    world: World,
) -> None:
    trade_id = await trade_at(world, machine.ALLOCATION_APPROVED)
    assert len(await world.services.raise_on_signal(mandate_signal())) == 1
    assert await world.services.raise_on_signal(mandate_signal()) == []  # already in exception
    await world.services.resolve_exception(caller("ops", world.pdp), f"{trade_id}.1", "reconsent")
    assert (await world.store.trade(trade_id)).state == machine.ALLOCATION_APPROVED
    # the same SET again (a redelivery after a crash before the ack): nothing
    assert await world.services.raise_on_signal(mandate_signal()) == []
    assert (await world.store.trade(trade_id)).state == machine.ALLOCATION_APPROVED
    # a new SET (the mandate suspended again) is a new exception
    (again,) = await world.services.raise_on_signal(mandate_signal("set-3"))
    assert again.exception_id == f"{trade_id}.2"
    assert len(await exception_events(world, trade_id)) == 2


async def test_a_revoked_token_raises_only_on_the_trades_it_moved(world: World) -> None:
    alice = await trade_at(world, machine.EXECUTED, desk="alice")
    carol = await trade_at(world, machine.ALLOCATION_PROPOSED, desk="carol")
    approved_by_bob = await trade_at(world, machine.ALLOCATION_APPROVED, desk="dave")
    (raised,) = await world.services.raise_on_signal(token_signal("tok-alice"))
    assert raised.trade_id == alice
    assert raised.reason == "token_revoked"
    assert (await world.store.trade(carol)).state == machine.ALLOCATION_PROPOSED
    # the approver's token is one the trade rests on too
    (other,) = await world.services.raise_on_signal(token_signal("tok-approver-dave", "set-9"))
    assert other.trade_id == approved_by_bob
    assert other.from_state == machine.ALLOCATION_APPROVED


async def test_signals_are_scoped_by_their_issuer(world: World) -> None:
    trade_id = await trade_at(world, machine.EXECUTED)
    assert await world.services.raise_on_signal(mandate_signal(iss=OTHER_ISSUER)) == []
    assert await world.services.raise_on_signal(token_signal("tok-alice", iss=OTHER_ISSUER)) == []
    assert (await world.store.trade(trade_id)).state == machine.EXECUTED
    # a trade made with a token of no recorded issuer (the CLI) rests on no token
    with pytest.raises(ValueError, match="either"):
        await world.store.resting_on(ISSUER)


async def test_a_signal_racing_a_settlement_leaves_one_consistent_outcome(world: World) -> None:
    """On PostgreSQL the two transactions really race on the trade's row: either the submission
    wins and the exception leaves ``settlement_submitted``, or the exception wins and the
    submission is out of order; never both moves from ``allocation_approved``."""

    async def submit(trade_id: str) -> str:
        try:
            await world.services.submit_settlement(
                caller("alice", world.pdp), trade_id, {"ssi": "X"}, "k-race"
            )
        except (DuplicateTransition, OutOfOrder):
            return "refused"
        return "submitted"

    for round_ in range(6):
        trade_id = await trade_at(world, machine.ALLOCATION_APPROVED)
        outcome, raised = await asyncio.gather(
            submit(trade_id), world.services.raise_on_signal(mandate_signal(f"set-race-{round_}"))
        )
        trade = await world.store.trade(trade_id)
        assert trade.state == machine.EXCEPTION
        (record,) = raised
        history = [r.transition for r in await world.store.history(trade_id)]
        assert history.count("exception#1") == 1
        if outcome == "submitted":
            assert record.from_state == machine.SETTLEMENT_SUBMITTED
            assert history[-2:] == ["submit_settlement", "exception#1"]
        else:
            assert record.from_state == machine.ALLOCATION_APPROVED
            assert "submit_settlement" not in history


async def test_an_older_store_gets_the_acting_token_columns(ref_url: str) -> None:
    store = await fresh_store(ref_url)
    async with store.db.transaction() as conn:
        await conn.execute(text("DROP TABLE ref_transitions"))
        await conn.execute(
            text(
                "CREATE TABLE ref_transitions (id INTEGER PRIMARY KEY, trade_id VARCHAR(64) "
                "NOT NULL, transition VARCHAR(64) NOT NULL, source VARCHAR(32), target "
                "VARCHAR(32) NOT NULL, actor VARCHAR(256) NOT NULL, idempotency_key "
                "VARCHAR(255), event_id VARCHAR(36) NOT NULL, at BIGINT NOT NULL)"
            )
        )
    await store.db.dispose()
    upgraded = TradeStore(Database(ref_url), store.signer)
    await upgraded.create_schema()
    await upgraded.create_schema()  # twice: nothing left to add
    async with upgraded.db.read() as conn:
        await conn.execute(text("SELECT token_iss, token_jti, mandate_id FROM ref_transitions"))
    async with upgraded.db.transaction() as conn:  # the next test gets the table as made today
        await conn.execute(text("DROP TABLE ref_transitions"))
    await upgraded.db.dispose()


# --------------------------------------------------------------------------- SET verification


@dataclass
class Keys:
    """The transmitter's published key set, as the JWKS would give it."""

    key: ec.EllipticCurvePrivateKey
    kid: str = "k1"

    async def candidates(self, kid: str | None, alg: str) -> list[PublicKey]:
        return [self.key.public_key()] if kid == self.kid and alg == "ES256" else []


TRANSMITTER = Keys(ec.generate_private_key(ec.SECP256R1()))
AUDIENCE = "c-reference-signals"


def a_set(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(time.time()),
        "jti": "set-1",
        "sub_id": {"format": "jwt_id", "iss": ISSUER, "jti": "tok-alice"},
        "events": {SESSION_REVOKED: {"event_timestamp": int(time.time())}},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def signed(
    claims: dict[str, Any], *, typ: str = "secevent+jwt", key: Any = None, **header: Any
) -> str:
    signer = Signer(key or TRANSMITTER.key, "ES256", TRANSMITTER.kid, typ)
    if not header:
        return signer.sign(claims)
    return jwt.encode(claims, key or TRANSMITTER.key, "ES256", {"kid": "k1", "typ": typ, **header})


REFUSED = [
    ("not a JWS", "not-a-jws", "invalid_request"),
    ("typ JWT", signed(a_set(), typ="JWT"), "invalid_request"),
    ("a key in the header", signed(a_set(), jku="https://evil.example/jwks"), "invalid_key"),
    ("another key", signed(a_set(), key=ec.generate_private_key(ec.SECP256R1())), "invalid_key"),
    ("another issuer", signed(a_set(iss=OTHER_ISSUER)), "invalid_issuer"),
    ("another audience", signed(a_set(aud="someone-else")), "invalid_audience"),
    ("no jti", signed(a_set(jti=None)), "invalid_request"),
    ("no events", signed(a_set(events={})), "invalid_request"),
    ("iat in the future", signed(a_set(iat=int(time.time()) + 3600)), "invalid_request"),
    ("exp", signed(a_set(exp=int(time.time()) + 60)), "invalid_request"),
]


@pytest.mark.parametrize(("case", "token", "err"), REFUSED, ids=[c[0] for c in REFUSED])
async def test_a_set_is_refused_with_its_rfc_8935_code(case: str, token: str, err: str) -> None:
    with pytest.raises(SetRefused) as refused:
        await SetVerifier(ISSUER, AUDIENCE, TRANSMITTER).verify(token)
    assert refused.value.err == err, case


async def test_a_verified_set_names_its_signal() -> None:
    verifier = SetVerifier(ISSUER, AUDIENCE, TRANSMITTER)
    claims = await verifier.verify(signed(a_set()))
    (signal,) = signals_of(claims)
    assert (signal.token_jti, signal.mandate_id, signal.reason) == (
        "tok-alice",
        None,
        "token_revoked",
    )
    mandate = {"format": "complex", "session": {"format": "opaque", "id": "M-7"},
               "tenant": {"format": "opaque", "id": "LEI"}}  # fmt: skip
    suspended = {TOKEN_CLAIMS_CHANGE: {"claims": {"mandate_status": "suspended"}}}
    (signal,) = signals_of(await verifier.verify(signed(a_set(sub_id=mandate, events=suspended))))
    assert (signal.mandate_id, signal.reason) == ("M-7", "mandate_suspended")
    resumed = {TOKEN_CLAIMS_CHANGE: {"claims": {"mandate_status": "active"}}}
    assert signals_of(await verifier.verify(signed(a_set(sub_id=mandate, events=resumed)))) == []
    stream = {"format": "opaque", "id": "stream-1"}
    verification = {VERIFICATION: {"state": "x"}}
    assert (
        signals_of(await verifier.verify(signed(a_set(sub_id=stream, events=verification)))) == []
    )


SUBJECTS_REFUSED = [
    ("another issuer's token", {"format": "jwt_id", "iss": OTHER_ISSUER, "jti": "t"}, "access_denied"),
    ("a jwt_id without jti", {"format": "jwt_id", "iss": ISSUER}, "invalid_request"),
    ("a session without id", {"format": "complex", "session": {"format": "opaque"}}, "invalid_request"),
    ("no subject", None, "invalid_request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "subject", "err"), SUBJECTS_REFUSED, ids=[c[0] for c in SUBJECTS_REFUSED]
)
async def test_a_subject_that_cannot_be_acted_on_is_refused(
    case: str, subject: Any, err: str
) -> None:
    claims = await SetVerifier(ISSUER, AUDIENCE, TRANSMITTER).verify(signed(a_set(sub_id=subject)))
    with pytest.raises(SetRefused) as refused:
        signals_of(claims)
    assert refused.value.err == err, case


CRITICAL_REFUSED = [
    ("a critical user", {"format": "complex", "session": {"format": "opaque", "id": "M-7"},
                         "user": {"format": "opaque", "id": "u-1"}}),
    ("a critical session that is not opaque", {"format": "complex",
                                               "session": {"format": "email", "email": "a@b.c"}}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "subject"), CRITICAL_REFUSED, ids=[c[0] for c in CRITICAL_REFUSED]
)
async def test_a_set_with_a_critical_member_it_cannot_process_is_refused(
    case: str, subject: Any
) -> None:
    """SSF 1.0 "Receiver Subject Processing": an event whose subject has a member of the
    transmitter's ``critical_subject_members`` that we cannot process (we process an ``opaque``
    ``session``) MUST be discarded: refused with ``invalid_request``, in ``sub_id`` or in the
    event (CAEP drafts). A member that is not critical is ignored (best effort)."""
    verifier = SetVerifier(ISSUER, AUDIENCE, TRANSMITTER, critical=frozenset({"user", "session"}))
    in_event = {SESSION_REVOKED: {"subject": subject}}
    for token in (signed(a_set(sub_id=subject)), signed(a_set(sub_id=None, events=in_event))):
        with pytest.raises(SetRefused) as refused:
            await verifier.verify(token)
        assert refused.value.err == "invalid_request", case
        assert "critical member" in refused.value.description
    device = {"format": "complex", "session": {"format": "opaque", "id": "M-7"},
              "device": {"format": "opaque", "id": "d-1"}}  # fmt: skip
    (signal,) = signals_of(await verifier.verify(signed(a_set(sub_id=device))))
    assert signal.mandate_id == "M-7"


def test_the_configuration_url_is_formed_from_the_issuer() -> None:
    assert configuration_url("https://as.example") == (
        "https://as.example/.well-known/ssf-configuration"
    )
    assert configuration_url("https://as.example/t1") == (
        "https://as.example/.well-known/ssf-configuration/t1"
    )
    assert issuer_of("https://as.example/.well-known/ssf-configuration/t1") == (
        "https://as.example/t1"
    )
    with pytest.raises(ValueError, match="not an SSF configuration URL"):
        issuer_of("https://as.example/ssf")


def test_the_signal_settings_come_together(tmp_path: Path) -> None:
    url = "https://as.example/.well-known/ssf-configuration"
    key = str(tmp_path / "client.pem")
    P = "TRUSTPLANE_REFERENCE_"
    settings = ReferenceSettings.from_env(
        {f"{P}SSF_CONFIGURATION_URL": url, f"{P}SSF_CLIENT_ID": "c1",
         f"{P}SSF_CLIENT_KEY_FILE": key, f"{P}SSF_ALLOW_INSECURE_LOOPBACK": "true"}
    )  # fmt: skip
    assert (settings.ssf_configuration_url, settings.ssf_client_id) == (url, "c1")
    assert settings.ssf_client_key_file == Path(key)
    assert settings.ssf_allow_insecure_loopback is True
    for env, match in [
        ({f"{P}SSF_CONFIGURATION_URL": url}, "SSF_CLIENT_ID"),
        ({f"{P}SSF_CONFIGURATION_URL": "ftp://x", f"{P}SSF_CLIENT_ID": "c",
          f"{P}SSF_CLIENT_KEY_FILE": key}, "https"),
        ({f"{P}SSF_ALLOW_INSECURE_LOOPBACK": "maybe"}, "true or false"),
    ]:  # fmt: skip
        with pytest.raises(ReferenceSettingsError, match=match):
            ReferenceSettings.from_env(env)
