"""A legal entity as the directory keeps it: the LEI (ISO 17442), its legal name, and what GLEIF says
about its registration. Every value is checked here, whatever its source (the CLI, a golden copy)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from stdnum import lei as stdnum_lei

MAX_NAME = 1000
COUNTRY = re.compile(r"^[A-Z]{2}$")
#: LEI-CDF 3.1 RegistrationStatusEnum values are upper-case words joined by underscores.
STATUS = re.compile(r"^[A-Z][A-Z_]{0,31}$")


class EntityError(ValueError):
    """A value cannot go into the directory; the message names the field and says why, ``kind``
    is the short reason an import report counts."""

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind


class Source(StrEnum):
    OPERATOR = "operator"  # ``trustplane entities add``
    GLEIF = "gleif"  # ``trustplane entities import`` of a golden-copy file


@dataclass(frozen=True, slots=True)
class LegalEntity:
    lei: str
    legal_name: str
    country: str | None
    #: GLEIF ``Registration.RegistrationStatus`` (ISSUED, LAPSED, RETIRED, ...); None if unknown.
    registration_status: str | None
    source: Source
    updated_at: int

    @property
    def lapsed(self) -> bool:
        """The LEI is not (or no longer) maintained: people should see that beside the name."""
        return self.registration_status not in (None, "ISSUED", "PENDING_TRANSFER")

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "source": self.source.value}


def check_lei(value: str) -> str:
    lei = value.strip().upper()
    if not stdnum_lei.is_valid(lei):
        raise EntityError(
            f"lei: {value[:40]!r} is not a valid ISO 17442 LEI (length, charset or check digits)",
            "invalid LEI",
        )
    return lei


def check_name(value: str) -> str:
    name = " ".join(value.split())
    if not name:
        raise EntityError("legal name: empty", "no legal name")
    if len(name) > MAX_NAME:
        raise EntityError(f"legal name: longer than {MAX_NAME} characters", "legal name too long")
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in name):
        raise EntityError(
            "legal name: contains control or format characters", "control characters in legal name"
        )
    return name


def check_country(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    country = value.strip().upper()
    if not COUNTRY.match(country):
        raise EntityError(
            f"country: {value[:10]!r} is not an ISO 3166-1 alpha-2 code", "invalid country"
        )
    return country


def check_status(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    status = value.strip().upper()
    if not STATUS.match(status):
        raise EntityError(
            f"registration status: {value[:40]!r} is not a GLEIF status word",
            "invalid registration status",
        )
    return status


def legal_entity(
    lei: str,
    legal_name: str,
    country: str | None,
    status: str | None,
    source: Source,
    now: int,
) -> LegalEntity:
    """A checked :class:`LegalEntity`, or :class:`EntityError` naming the first bad field."""
    return LegalEntity(
        check_lei(lei),
        check_name(legal_name),
        check_country(country),
        check_status(status),
        source,
        now,
    )
