"""What the consent page says, in words a person reads: every identifier (scope string, action code,
LEI, resource URI) becomes secondary detail beside a human label.

- scopes: the vocabulary's description (``TRUSTPLANE_SCOPES_FILE``);
- ``authorization_details``: the type's schema titles; enum values by the ``enumTitles`` annotation
  of the type file (``{"create_order": "Create orders"}``), else the code with its underscores
  turned into spaces; members with ``"format": "lei"`` by the entity directory's legal names;
- LEIs: the legal name from the entity directory, and the registration status when the LEI lapsed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from trustplane.entities.model import LegalEntity
from trustplane.rar.registry import AuthorizationDetailsRegistry

#: Shown where the directory has no entry for an LEI.
UNKNOWN_ENTITY = "Legal entity not in this service's directory"


@dataclass(frozen=True, slots=True)
class Item:
    """One value: ``text`` for people, ``code`` the identifier behind it (None if ``text`` is the
    value itself), ``note`` a warning that belongs beside it (a lapsed LEI)."""

    text: str
    code: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    items: list[Item]


@dataclass(frozen=True, slots=True)
class Instruction:
    """One ``authorization_details`` object."""

    title: str
    description: str
    code: str
    rows: list[Row]


def humanise(code: str) -> str:
    words = code.replace("_", " ").replace(":", " ").strip()
    return words[:1].upper() + words[1:] if words else code


def entity(lei: str, names: Mapping[str, LegalEntity]) -> Item:
    known = names.get(lei)
    if known is None:
        return Item(UNKNOWN_ENTITY, lei)
    note = None
    if known.lapsed:
        status = (known.registration_status or "").replace("_", " ").lower()
        note = f"LEI registration status: {status}"
    return Item(known.legal_name, lei, note)


def _items_schema(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    items = schema.get("items")
    return items if isinstance(items, Mapping) else schema


def _is_lei(schema: Mapping[str, Any]) -> bool:
    return _items_schema(schema).get("format") == "lei"


def leis_in(
    registry: AuthorizationDetailsRegistry, details: Iterable[Mapping[str, Any]]
) -> set[str]:
    """Every LEI a detail names (members whose schema says ``"format": "lei"``)."""
    found: set[str] = set()
    for detail in details:
        kind = registry.types.get(str(detail.get("type")))
        for name, sub in (kind.schema.get("properties", {}) if kind else {}).items():
            if name in detail and _is_lei(sub):
                value = detail[name]
                found.update(str(v) for v in (value if isinstance(value, list) else [value]))
    return found


def _values(
    schema: Mapping[str, Any], value: Any, shown: str, names: Mapping[str, LegalEntity]
) -> list[Item]:
    values = value if isinstance(value, list) else [value]
    if _is_lei(schema):
        return [entity(str(v), names) for v in values]
    items = _items_schema(schema)
    if "enum" in items:
        titles = items.get("enumTitles", {})
        return [Item(str(titles.get(v) or humanise(str(v))), str(v)) for v in values]
    return [Item(shown)]


def instruction(
    registry: AuthorizationDetailsRegistry,
    detail: Mapping[str, Any],
    names: Mapping[str, LegalEntity],
) -> Instruction:
    code = str(detail.get("type"))
    kind = registry.types.get(code)
    if kind is None:  # not reachable after validation; shown plainly rather than hidden
        return Instruction(humanise(code), "", code, [])
    described = registry.describe(dict(detail))[1:]  # same order as the present members
    present = [
        (n, s) for n, s in kind.schema.get("properties", {}).items() if n != "type" and n in detail
    ]
    rows = [
        Row(label, _values(sub, detail[name], shown, names))
        for (name, sub), (label, shown) in zip(present, described, strict=True)
    ]
    return Instruction(kind.title, kind.description, code, rows)
