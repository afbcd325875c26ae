"""The scope vocabulary: business verbs on material objects, each bound to the resource servers
(audiences) that accept it. Configuration, not code: a TOML file (``TRUSTPLANE_SCOPES_FILE``), with
``default_scopes.toml`` shipped as the default.

Generic names (``read``, ``write``, ``admin``, ``*_all``, ...) are refused when the file is loaded: a
scope that cannot be explained to an auditor does not get into the vocabulary.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources as pkg_resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SCOPE_NAME = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$")
GENERIC_WORDS = frozenset(
    {
        "read",
        "write",
        "admin",
        "all",
        "any",
        "full",
        "full_access",
        "root",
        "superuser",
        "manage",
        "api",
    }
)


class VocabularyError(ValueError):
    """The vocabulary file is invalid; the message names the offending entry."""


@dataclass(frozen=True, slots=True)
class Scope:
    name: str
    description: str
    resources: frozenset[str]


@dataclass(frozen=True, slots=True)
class Vocabulary:
    scopes: dict[str, Scope]
    resources: dict[str, str]
    #: trustplane's own APIs (audiences under the issuer): granted only by an operator.
    internal: frozenset[str] = frozenset()

    def accepts(self, resource: str, scope: str) -> bool:
        entry = self.scopes.get(scope)
        return entry is not None and resource in entry.resources


def check_scope_name(name: str) -> None:
    words = re.split(r"[:_]", name)
    if (
        name in GENERIC_WORDS
        or name.endswith("_all")
        or any(w in GENERIC_WORDS for w in words)
        or "*" in name
    ):
        raise VocabularyError(f"scope {name!r} is too generic: name a business verb on an object")
    if not SCOPE_NAME.match(name):
        raise VocabularyError(f"scope {name!r} must look like 'object:verb' (e.g. 'order:create')")


def check_resource_uri(uri: str) -> None:
    """RFC 8707 §2: an absolute URI without a fragment."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise VocabularyError(f"resource {uri!r} is not a valid URI") from None
    if not parts.scheme or not parts.netloc or parts.fragment or "#" in uri:
        raise VocabularyError(f"resource {uri!r} must be an absolute URI without a fragment")


def parse_vocabulary(data: dict[str, Any]) -> Vocabulary:
    resources_in = data.get("resources", {})
    scopes_in = data.get("scopes", {})
    if not isinstance(resources_in, dict) or not isinstance(scopes_in, dict) or not scopes_in:
        raise VocabularyError(
            'vocabulary needs [resources."URI"] tables and [scopes."name"] tables'
        )
    resources: dict[str, str] = {}
    for uri, spec in resources_in.items():
        check_resource_uri(uri)
        if not isinstance(spec, dict):
            raise VocabularyError(f"resource {uri!r} must be a table (with a description)")
        resources[uri] = str(spec.get("description", ""))
    scopes: dict[str, Scope] = {}
    for name, spec in scopes_in.items():
        check_scope_name(name)
        bound = spec.get("resources") if isinstance(spec, dict) else None
        if not isinstance(bound, list) or not bound:
            raise VocabularyError(f"scope {name!r} must list the resources that accept it")
        unknown = [r for r in bound if not isinstance(r, str) or r not in resources]
        if unknown:
            names = ", ".join(str(r) for r in unknown)
            raise VocabularyError(f"scope {name!r} names unknown resource(s): {names}")
        scopes[name] = Scope(name, str(spec.get("description", "")), frozenset(bound))
    return Vocabulary(scopes, resources)


@dataclass(frozen=True, slots=True)
class InternalApi:
    """One of trustplane's own protected APIs: its audience is the issuer URL plus ``path``."""

    path: str
    description: str
    scopes: dict[str, str]
    #: Scope names a configured vocabulary may also bind to its own resource servers: the internal
    #: audience is added to the configured binding instead of refusing the name.
    shared: frozenset[str] = frozenset()


INTERNAL_APIS = (
    InternalApi(
        "/audit",
        "trustplane audit ledger: queries, entries, proofs and exports",
        {
            "audit:query": "Query the audit ledger: entries, proofs, transactions, exports",
            "audit:ingest": "Record one's own signed settlement events in the audit ledger",
        },
    ),
    InternalApi(
        "/access/v1",
        "trustplane policy decision point (OpenID AuthZEN Authorization API)",
        {
            "decision:evaluate": "Ask the policy decision point for access decisions",
            "policy:simulate": "Replay recorded decisions against a candidate policy bundle",
        },
    ),
    InternalApi(
        "/federation",
        "trustplane partner trust registry admin API",
        {"partner:administer": "Add, update, list, show and disable partner trust profiles"},
    ),
    InternalApi(
        "/mandates",
        "trustplane mandate store: create, accept, amend, suspend, revoke, list, history",
        {
            "mandate:view": "Read mandates, their versions and their history",
            "mandate:administer": "Create, accept, amend, suspend, resume and revoke mandates",
        },
    ),
    InternalApi(
        "/ssf",
        "trustplane shared signals transmitter: SSF 1.0 streams, status, verification, poll",
        {"ssf:stream": "Manage one's own shared-signals streams and poll their events"},
    ),
    InternalApi(
        "/events",
        "trustplane security events: signed, long-polled, resumable by cursor (GET /events)",
        {"event:subscribe": "Read the signed security events of the authorization server"},
        # the same verb as the reference services' event streams (default_scopes.toml)
        shared=frozenset({"event:subscribe"}),
    ),
)


def internal_audience(issuer: str, path: str) -> str:
    return issuer.rstrip("/") + path


def with_internal_apis(vocabulary: Vocabulary, issuer: str) -> Vocabulary:
    """Add trustplane's own APIs (audiences under the issuer URL) to a configured vocabulary.

    A client reaches them only if its registration lists the audience and the scope, and only an
    operator can register that (``trustplane clients add``): dynamic registration (RFC 7591) and
    self-management (RFC 7592) refuse them, so an initial access token is not an admin credential.
    A scope an API ``shares`` (``event:subscribe``) may be bound by the vocabulary to other
    resource servers too: what a token may do is the pair (audience, scope), and the internal
    audience stays operator-only."""
    resources = dict(vocabulary.resources)
    scopes = dict(vocabulary.scopes)
    internal: set[str] = set()
    for api in INTERNAL_APIS:
        audience = internal_audience(issuer, api.path)
        internal.add(audience)
        resources[audience] = api.description
        for name, description in api.scopes.items():
            check_scope_name(name)
            configured = scopes.get(name)
            if configured is not None and name in api.shared:
                bound = configured.resources | {audience}
                scopes[name] = Scope(name, configured.description, bound)
                continue
            if configured is not None:
                raise VocabularyError(f"scope {name!r} is reserved for trustplane's own {api.path}")
            scopes[name] = Scope(name, description, frozenset({audience}))
    return Vocabulary(scopes, resources, vocabulary.internal | internal)


def load_vocabulary(path: Path | None) -> Vocabulary:
    try:
        if path is None:
            text = (
                pkg_resources.files("trustplane.protocol")
                .joinpath("default_scopes.toml")
                .read_text()
            )
        else:
            text = path.read_text(encoding="utf-8")
        return parse_vocabulary(tomllib.loads(text))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise VocabularyError(f"cannot read scope vocabulary {path}: {exc}") from exc
