"""What the entity directory accepts: one table-driven negative case per rule."""

from __future__ import annotations

import pytest

from trustplane.entities.model import EntityError, Source, legal_entity

LEI = "5493001KJTIIGC8Y1R12"


def test_values_are_normalised() -> None:
    entity = legal_entity(
        f" {LEI.lower()} ", "  Arranger \n Securities  S.A. ", "lu", "issued", Source.OPERATOR, 1
    )
    assert (entity.lei, entity.legal_name, entity.country, entity.registration_status) == (
        LEI,
        "Arranger Securities S.A.",
        "LU",
        "ISSUED",
    )
    assert not entity.lapsed
    assert legal_entity(LEI, "X", None, "LAPSED", Source.GLEIF, 1).lapsed
    assert not legal_entity(LEI, "X", "", "", Source.GLEIF, 1).lapsed  # unknown status: no warning


@pytest.mark.parametrize(
    ("lei", "name", "country", "status", "kind"),
    [
        ("5493001KJTIIGC8Y1R13", "X", None, None, "invalid LEI"),  # check digits
        ("5493001KJTIIGC8Y1R1", "X", None, None, "invalid LEI"),  # length
        ("5493001KJTIIGC8Y1R1!", "X", None, None, "invalid LEI"),  # charset
        (LEI, "   ", None, None, "no legal name"),
        (LEI, "x" * 1001, None, None, "legal name too long"),
        (LEI, "Evil\u202eCorp", None, None, "control characters in legal name"),
        (LEI, "X", "DEU", None, "invalid country"),
        (LEI, "X", "D1", None, "invalid country"),
        (LEI, "X", None, "issued!", "invalid registration status"),
    ],
)
def test_refused(lei: str, name: str, country: str | None, status: str | None, kind: str) -> None:
    with pytest.raises(EntityError) as caught:
        legal_entity(lei, name, country, status, Source.OPERATOR, 1)
    assert caught.value.kind == kind
