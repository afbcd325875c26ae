"""Mandate test helpers: a grantee client registered for both shipped details types."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import ClientKit, register_kit
from tests.rar.test_registry import SETTLEMENT, TRADE
from trustplane.app import Services
from trustplane.mandates.model import LegalBasis, MandateTerms

GRANTOR = "529900T8BM49AURSDO55"  # a valid ISO 17442 LEI (Northwind AM in the scenarios)
DETAILS_TYPES = ["trade_instruction", "settlement_instruction"]


async def grantee(services: Services, **metadata: Any) -> ClientKit:
    values: dict[str, Any] = {
        "authorization_details_types": DETAILS_TYPES,
        "scope": "order:create order:cancel settlement:submit",
    }
    values.update(metadata)
    return await register_kit(services, **values)


def terms(client_id: str, **overrides: Any) -> MandateTerms:
    values: dict[str, Any] = {
        "grantor_lei": GRANTOR,
        "grantee_client_id": client_id,
        "scopes": ("order:create",),
        "authorization_details": (TRADE,),
        "effective_until": int(time.time()) + 30 * 86400,
        "legal_basis": LegalBasis.MANDATE,
        "grantor_person": "alice",
    }
    values.update(overrides)
    return MandateTerms(**values)


@pytest.fixture
async def client_id(services: Services) -> str:
    return (await grantee(services)).client_id


__all__ = ["GRANTOR", "SETTLEMENT", "TRADE", "grantee", "terms"]
