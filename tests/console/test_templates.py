"""The console's templates keep the CSP honest: no inline script, no inline style, no event
handler attributes, no ``javascript:`` URL; every form that posts carries the CSRF field."""

from __future__ import annotations

import re
from importlib import resources

import pytest

TEMPLATES = sorted(
    p
    for p in (resources.files("trustplane.console") / "templates").iterdir()
    if p.name.endswith(".html")
)


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.name for t in TEMPLATES])
def test_no_inline_script_style_or_handlers(template) -> None:  # type: ignore[no-untyped-def]
    text = template.read_text()
    assert re.search(r"<script(?![^>]*\bsrc=)", text) is None
    assert re.search(r"<style", text) is None
    assert re.search(r"\sstyle=", text) is None
    assert re.search(r"\son[a-z]+=", text) is None
    assert "javascript:" not in text


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.name for t in TEMPLATES])
def test_every_post_form_carries_the_csrf_token(template) -> None:  # type: ignore[no-untyped-def]
    forms = re.findall(r"<form[^>]*method=\"post\".*?</form>", template.read_text(), re.S)
    for form in forms:
        assert '<input type="hidden" name="csrf" value="{{ csrf }}">' in form


def test_the_forms_are_found() -> None:
    posting = [t.name for t in TEMPLATES if 'method="post"' in t.read_text()]
    assert sorted(posting) == ["base.html", "confirm.html", "partner.html", "policy.html"]
