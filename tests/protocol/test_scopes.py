"""The scope vocabulary: business verbs on material objects, bound to the audiences that accept them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from trustplane.protocol.scopes import (
    VocabularyError,
    load_vocabulary,
    parse_vocabulary,
    with_internal_apis,
)

EXECUTION = "https://execution.example/api"
CLEARING = "https://clearing.example/api"
ALLOCATION = "https://allocation.example/api"
REPORTING = "https://reporting.example/api"


def vocabulary(scopes: Any = None, resources: Any = None) -> dict[str, Any]:
    return {
        "resources": {EXECUTION: {"description": "execution"}} if resources is None else resources,
        "scopes": {"order:create": {"resources": [EXECUTION]}} if scopes is None else scopes,
    }


def test_the_default_vocabulary_loads() -> None:
    vocab = load_vocabulary(None)

    assert set(vocab.scopes) == {
        "order:create",
        "order:cancel",
        "allocation:propose",
        "allocation:approve",
        "settlement:submit",
        "settlement:amend",
        "report:view",
        "report:export",
        # the reference settlement services' routes (trustplane.reference.http)
        "trade:execute",
        "settlement:cancel",
        "settlement:confirm",
        "exception:view",
        "exception:resolve",
        "event:subscribe",
    }
    assert vocab.accepts(EXECUTION, "trade:execute") is True
    assert vocab.accepts(CLEARING, "trade:execute") is False
    assert vocab.accepts(CLEARING, "settlement:confirm") is True
    for shared in ("exception:view", "exception:resolve", "event:subscribe"):
        assert vocab.scopes[shared].resources == frozenset(
            {EXECUTION, ALLOCATION, CLEARING, REPORTING}
        )
    assert set(vocab.resources) == {EXECUTION, ALLOCATION, CLEARING, REPORTING}
    assert vocab.resources[EXECUTION] == "Order entry and execution"
    assert vocab.scopes["order:create"].description == "Create an order"
    assert vocab.scopes["settlement:submit"].resources == frozenset({CLEARING})
    assert vocab.accepts(EXECUTION, "order:create") is True
    assert vocab.accepts(CLEARING, "order:create") is False
    assert vocab.accepts(EXECUTION, "order:delete") is False


def test_a_vocabulary_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "scopes.toml"
    path.write_text(
        '[resources."https://desk.example/api"]\n'
        'description = "Desk"\n'
        '[scopes."quote:request"]\n'
        'description = "Ask for a quote"\n'
        'resources = ["https://desk.example/api"]\n'
    )

    vocab = load_vocabulary(path)

    assert list(vocab.scopes) == ["quote:request"]
    assert vocab.resources == {"https://desk.example/api": "Desk"}
    assert vocab.accepts("https://desk.example/api", "quote:request") is True


@pytest.mark.parametrize(
    "name",
    [
        "read",
        "write",
        "admin",
        "trade_all",
        "order:*",
        "admin:orders",
        "full_access",
        "*",
        "order:read",
        "order:write",
        "trade:all",
        "api:call",
        "order:manage",
        "order_all",
        "root:access",
    ],
)
def test_generic_scope_names_are_refused(name: str) -> None:
    with pytest.raises(
        VocabularyError, match=r"is too generic: name a business verb on an object$"
    ):
        parse_vocabulary(vocabulary({name: {"resources": [EXECUTION]}}))


@pytest.mark.parametrize(
    "name",
    [
        "order",
        "Order:Create",
        "order:create:now",
        "order-create",
        "order:",
        ":create",
        "1order:create",
        "order: create",
    ],
)
def test_scope_names_must_look_like_object_verb(name: str) -> None:
    with pytest.raises(VocabularyError, match=r"must look like 'object:verb'"):
        parse_vocabulary(vocabulary({name: {"resources": [EXECUTION]}}))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "^vocabulary needs"),
        ({"resources": {EXECUTION: {}}}, "^vocabulary needs"),
        (vocabulary(scopes={}), "^vocabulary needs"),
        (vocabulary(scopes=["order:create"]), "^vocabulary needs"),
        (vocabulary(resources=[EXECUTION]), "^vocabulary needs"),
        (vocabulary(resources="x"), "^vocabulary needs"),
        (vocabulary({"order:create": {}}), "^scope 'order:create' must list the resources"),
        (
            vocabulary({"order:create": {"resources": []}}),
            "^scope 'order:create' must list the resources",
        ),
        (
            vocabulary({"order:create": {"resources": EXECUTION}}),
            "^scope 'order:create' must list the resources",
        ),
        (
            vocabulary({"order:create": "execution"}),
            "^scope 'order:create' must list the resources",
        ),
        (
            vocabulary({"order:create": [EXECUTION]}),
            "^scope 'order:create' must list the resources",
        ),
        (
            vocabulary({"order:create": {"resources": [CLEARING]}}),
            f"^scope 'order:create' names unknown resource\\(s\\): {CLEARING}$",
        ),
        (
            vocabulary({"order:create": {"resources": [1]}}),
            "^scope 'order:create' names unknown resource\\(s\\): 1$",
        ),
        (
            vocabulary({"order:create": {"resources": [[EXECUTION]]}}),
            "^scope 'order:create' names unknown resource\\(s\\): \\[",
        ),
        (
            vocabulary(resources={EXECUTION: "execution"}),
            f"^resource '{EXECUTION}' must be a table",
        ),
        (
            vocabulary(resources={EXECUTION: ["execution"]}),
            f"^resource '{EXECUTION}' must be a table",
        ),
    ],
)
def test_bad_shapes_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(VocabularyError, match=message):
        parse_vocabulary(data)


@pytest.mark.parametrize(
    "uri",
    [
        "https://execution.example/api#orders",
        "https://execution.example/api#",
        "/api",
        "execution.example/api",
        "https://",
        "https://[::1/api",
    ],
)
def test_resource_must_be_an_absolute_uri_without_fragment(uri: str) -> None:
    with pytest.raises(VocabularyError, match=rf"^resource {re.escape(repr(uri))} "):
        parse_vocabulary(vocabulary({"order:create": {"resources": [uri]}}, {uri: {}}))


def test_unreadable_or_invalid_files_are_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[scopes\n")

    with pytest.raises(VocabularyError, match=r"^cannot read scope vocabulary .*broken.toml"):
        load_vocabulary(broken)
    with pytest.raises(VocabularyError, match=r"^cannot read scope vocabulary .*missing.toml"):
        load_vocabulary(tmp_path / "missing.toml")


def test_internal_apis_are_added_under_the_issuer() -> None:
    vocab = with_internal_apis(load_vocabulary(None), "https://as.example/")
    assert vocab.accepts("https://as.example/audit", "audit:query")
    assert vocab.accepts("https://as.example/access/v1", "decision:evaluate")
    assert not vocab.accepts("https://as.example/audit", "decision:evaluate")
    assert "order:create" in vocab.scopes


def test_a_configured_scope_cannot_take_an_internal_name(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text(
        '[resources."https://x.example/api"]\ndescription = "x"\n'
        '[scopes."audit:query"]\nresources = ["https://x.example/api"]\n'
    )
    with pytest.raises(VocabularyError, match="reserved"):
        with_internal_apis(load_vocabulary(path), "https://as.example")


def test_a_shared_internal_scope_keeps_its_configured_resources() -> None:
    """``event:subscribe`` names the reference services' event streams and the authorization
    server's own ``/events``: both audiences accept it; the internal one stays operator-only."""
    vocab = with_internal_apis(load_vocabulary(None), "https://as.example/")
    assert vocab.accepts("https://as.example/events", "event:subscribe")
    assert vocab.accepts("https://execution.example/api", "event:subscribe")
    assert "https://as.example/events" in vocab.internal
    assert not vocab.accepts("https://as.example/events", "audit:query")


def test_a_shared_internal_scope_absent_from_the_vocabulary_is_internal_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v.toml"
    path.write_text(
        '[resources."https://x.example/api"]\ndescription = "x"\n'
        '[scopes."order:create"]\nresources = ["https://x.example/api"]\n'
    )
    vocab = with_internal_apis(load_vocabulary(path), "https://as.example")
    assert vocab.scopes["event:subscribe"].resources == {"https://as.example/events"}
