"""Shared helpers for the policy tests: the default bundle, entities of the trading domain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trustplane.authzen.model import DecisionRequest, Entity
from trustplane.policy.bundle import BundleSource, CompiledBundle, compile_bundle, load_dir

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"
NWAM = Entity("LegalEntity", "NWAM0000000000000001")
ARR = Entity("LegalEntity", "ARR00000000000000002")


@pytest.fixture(scope="session")
def default_source() -> BundleSource:
    return load_dir(REPO_POLICIES)


@pytest.fixture(scope="session")
def default_compiled(default_source: BundleSource) -> CompiledBundle:
    return compile_bundle(default_source)


def client(cid: str = "nw-oms", lei: Entity = NWAM, scopes: tuple[str, ...] = ()) -> Entity:
    return Entity("Client", cid, {"legal_entity": lei, "scopes": frozenset(scopes)}, (lei,))


def order(oid: str = "ord-1", owner: Entity = NWAM, *, restricted: bool = False) -> Entity:
    instrument = Entity(
        "Instrument",
        "XS666" if restricted else "XS001",
        {"instrument_class": "bond", "restricted": restricted},
    )
    return Entity(
        "Order",
        oid,
        {"owner": owner, "account": Entity("Account", "ACC-1"), "instrument": instrument},
    )


def trade(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "data_region": "eu",
        "delegation_depth": 0,
        "amount_minor": 250_000_000,
        "currency": "EUR",
        "instrument_class": "bond",
    }
    base.update(overrides)
    return base


def order_request(**kw: Any) -> DecisionRequest:
    return DecisionRequest(
        kw.pop("subject", client()),
        kw.pop("action", "order:create"),
        kw.pop("resource", order()),
        trade(**kw),
    )
