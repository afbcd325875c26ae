"""Cedar's rendering of a parsed schema (``str(cedarpy.Schema)``), read back: the declared
attributes of every common type, entity type and action context, with their types resolved, and
the text written again with some attribute declarations removed (the per-slice schemas of
:mod:`trustplane.policy.attribute_slice`).

Only the forms Cedar renders are read (one declaration after another: ``type``, ``entity`` with
``in``, a shape, ``enum`` or ``tags``, ``action`` with ``in`` and ``appliesTo``); anything else (a
namespace, an escaped name) raises :class:`Unsupported`, and the caller then slices nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(
    r'\s+|(?P<str>"(?:[^"\\]|\\.)*")|(?P<id>[A-Za-z_][A-Za-z0-9_]*)|(?P<p>::|[{}\[\]<>,;:?=@()])'
)
_PRIMS = {"String": "str", "Long": "long", "Bool": "bool"}
_EXTENSIONS = frozenset({"decimal", "ipaddr", "datetime", "duration"})


class Unsupported(Exception):
    """A schema or policy form the slicer does not read: no plan, requests go whole."""


@dataclass(frozen=True, slots=True)
class Attr:
    name: str
    raw: str  # the name as written (an identifier or a quoted string), with its annotations
    required: bool
    type: Any


@dataclass(frozen=True, slots=True)
class Rec:
    attrs: tuple[Attr, ...]


@dataclass(frozen=True, slots=True)
class SetOf:
    element: Any


def _tokens(text: str) -> list[tuple[str, str, int, int]]:
    out: list[tuple[str, str, int, int]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise Unsupported(f"schema text at {pos}")
        if m.lastgroup is not None:
            out.append((m.lastgroup, m.group(), m.start(), m.end()))
        pos = m.end()
    return out


class _Parser:
    """Cedar's rendering of a parsed schema (``str(cedarpy.Schema)``): declarations of common
    types, entity types and actions; each type expression's span is noted so that the text can be
    written again with attributes removed."""

    def __init__(self, text: str) -> None:
        self.text, self.toks, self.i = text, _tokens(text), 0
        self.common: dict[str, Any] = {}
        self.entities: dict[str, Rec | None] = {}
        self.enums: dict[str, frozenset[str]] = {}
        self.contexts: dict[str, Any] = {}
        self.spans: list[tuple[int, int, Any]] = []  # (start, end, type) to render again

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self, want: str | None = None, kind: str | None = None) -> str:
        if self.i >= len(self.toks):
            raise Unsupported("schema text ends early")
        k, text, _, _ = self.toks[self.i]
        if (want is not None and text != want) or (kind is not None and k != kind):
            raise Unsupported(f"schema text: {text!r}")
        self.i += 1
        return text

    def annotations(self) -> None:
        while self.peek() == "@":
            self.take("@")
            self.take(kind="id")
            if self.peek() == "(":
                self.take("(")
                self.take(kind="str")
                self.take(")")

    def typ(self) -> Any:
        if self.peek() == "{":
            return self.record()
        name = self.path()
        if name == "Set" and self.peek() == "<":
            self.take("<")
            element = self.typ()
            self.take(">")
            return SetOf(element)
        return name

    def path(self) -> str:
        parts = [self.take(kind="id")]
        while self.peek() == "::":
            self.take("::")
            parts.append(self.take(kind="id"))
        return "::".join(parts)

    def record(self) -> Rec:
        self.take("{")
        attrs: list[Attr] = []
        while self.peek() != "}":
            start = self.toks[self.i][2]
            self.annotations()
            kind, raw = self.toks[self.i][0], self.take()
            if kind == "str":
                if "\\" in raw:
                    raise Unsupported("an escaped attribute name")
                name = raw[1:-1]
            elif kind == "id":
                name = raw
            else:
                raise Unsupported(f"schema text: {raw!r}")
            head = self.text[start : self.toks[self.i - 1][3]]
            required = True
            if self.peek() == "?":
                self.take("?")
                required = False
            self.take(":")
            attrs.append(Attr(name, head, required, self.typ()))
            if self.peek() == ",":
                self.take(",")
        self.take("}")
        return Rec(tuple(attrs))

    def spanned(self) -> Any:
        start = self.toks[self.i][2]
        found = self.typ()
        self.spans.append((start, self.toks[self.i - 1][3], found))
        return found

    def declarations(self) -> None:
        while self.i < len(self.toks):
            self.annotations()
            keyword = self.take(kind="id")
            if keyword == "type":
                name = self.take(kind="id")
                self.take("=")
                self.common[name] = self.spanned()
            elif keyword == "entity":
                self.entity()
            elif keyword == "action":
                self.action()
            else:
                raise Unsupported(f"schema declaration {keyword!r}")
            self.take(";")

    def entity(self) -> None:
        names = [self.take(kind="id")]
        while self.peek() == ",":
            self.take(",")
            names.append(self.take(kind="id"))
        shape: Rec | None = None
        if self.peek() == "enum":
            self.take("enum")
            values = self.strings("]")
            self.enums.update(dict.fromkeys(names, frozenset(values)))
        if self.peek() == "in":
            self.take("in")
            self.take("[")
            while self.peek() != "]":
                self.path()
                if self.peek() == ",":
                    self.take(",")
            self.take("]")
        if self.peek() == "=":
            self.take("=")
        if self.peek() == "{":
            found = self.spanned()
            assert isinstance(found, Rec)
            shape = found
        if self.peek() == "tags":
            self.take("tags")
            self.typ()
        for name in names:
            self.entities[name] = shape

    def strings(self, end: str) -> list[str]:
        self.take("[")
        values: list[str] = []
        while self.peek() != end:
            raw = self.take(kind="str")
            if "\\" in raw:
                raise Unsupported("an escaped string")
            values.append(raw[1:-1])
            if self.peek() == ",":
                self.take(",")
        self.take(end)
        return values

    def action(self) -> None:
        names: list[str] = []
        while True:
            raw = self.take()
            if "\\" in raw:
                raise Unsupported("an escaped action name")
            names.append(raw.strip('"'))
            if self.peek() != ",":
                break
            self.take(",")
        if self.peek() == "in":
            self.take("in")
            self.take("[")
            while self.peek() != "]":
                self.take()
            self.take("]")
        context: Any = Rec(())
        if self.peek() == "appliesTo":
            self.take("appliesTo")
            self.take("{")
            while self.peek() != "}":
                key = self.take(kind="id")
                self.take(":")
                if key == "context":
                    context = self.spanned()
                elif self.peek() == "[":
                    while self.peek() != "]":
                        self.take()
                    self.take("]")
                else:
                    self.path()
                if self.peek() == ",":
                    self.take(",")
            self.take("}")
        self.contexts.update(dict.fromkeys(names, context))


def _render(t: Any, keep: frozenset[str]) -> str:
    if isinstance(t, Rec):
        kept = [a for a in t.attrs if a.name in keep]
        inner = ", ".join(
            f"{a.raw}{'' if a.required else '?'}: {_render(a.type, keep)}" for a in kept
        )
        return "{" + inner + "}"
    if isinstance(t, SetOf):
        return f"Set<{_render(t.element, keep)}>"
    return str(t)


# Resolved types: ("str",), ("long",), ("bool",), ("set", T), ("record", {name: (required, T)},
# Rec), ("entity", name, enum values or None), ("other",) for what is only checked by Cedar.


class _Types:
    def __init__(self, parsed: _Parser) -> None:
        if set(parsed.common) & set(parsed.entities):
            raise Unsupported("a name is both a common type and an entity type")
        self.p = parsed
        self.memo: dict[str, Any] = {}

    def resolve(self, t: Any, depth: int = 0) -> Any:
        if depth > 64:
            raise Unsupported("types nested too deeply")
        if isinstance(t, Rec):
            fields = {a.name: (a.required, self.resolve(a.type, depth + 1)) for a in t.attrs}
            return ("record", fields, t)
        if isinstance(t, SetOf):
            return ("set", self.resolve(t.element, depth + 1))
        name = str(t)
        if name.startswith("__cedar::"):
            bare = name.removeprefix("__cedar::")
            return (_PRIMS[bare],) if bare in _PRIMS else ("other",)
        if name in self.p.common:
            if name not in self.memo:
                self.memo[name] = self.resolve(self.p.common[name], depth + 1)
            return self.memo[name]
        if name in self.p.entities:
            return ("entity", name, self.p.enums.get(name))
        if name in _PRIMS:
            return (_PRIMS[name],)
        if name in _EXTENSIONS:
            return ("other",)
        raise Unsupported(f"type {name!r}")


class ParsedSchema:
    """A schema's declarations: ``common`` types, ``entities`` (their shape, or None), ``contexts``
    (each action's context type); :meth:`resolve` turns a declared type into the resolved form,
    :meth:`without` writes the schema again keeping only the attributes named in ``keep``."""

    def __init__(self, text: str) -> None:
        parser = _Parser(text)
        parser.declarations()
        self.text = text
        self.common, self.entities, self.contexts = parser.common, parser.entities, parser.contexts
        self._spans = parser.spans
        self._types = _Types(parser)

    def resolve(self, t: Any) -> Any:
        return self._types.resolve(t)

    def without(self, keep: frozenset[str]) -> str:
        text = self.text
        for start, end, t in sorted(self._spans, key=lambda s: -s[0]):
            text = text[:start] + _render(t, keep) + text[end:]
        return text


def parse_schema(text: str) -> ParsedSchema:
    """Read Cedar's rendering of a schema; :class:`Unsupported` for a form it does not read."""
    return ParsedSchema(text)
