"""Bundles: the default bundle's own cases, validation that refuses, the content version."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.policy.conftest import REPO_POLICIES
from trustplane.policy.bundle import (
    BundleError,
    BundleSource,
    CompiledBundle,
    compile_bundle,
    content_version,
    default_bundle,
    load_dir,
)
from trustplane.policy.service import PublishRefused, check_bundle
from trustplane.policy.testing import load_cases, run_cases


def _cases() -> list[str]:
    compiled = compile_bundle(load_dir(REPO_POLICIES))
    return [f"{c.file}::{c.name}" for c in load_cases(compiled)]


@pytest.mark.parametrize("case", _cases())
def test_default_bundle_case(case: str, default_compiled: CompiledBundle) -> None:
    """Each case of policies/tests/*.yaml is one test of the suite."""
    results = {f"{r.file}::{r.name}": r for r in run_cases(default_compiled)}
    result = results[case]
    assert result.passed, result.problem


def test_default_bundle_covers_every_rule(default_compiled: CompiledBundle) -> None:
    """Every policy of the default bundle is the expected reason of at least one case."""
    expected = {r for c in load_cases(default_compiled) for r in c.reasons or ()}
    assert set(default_compiled.policy_ids) <= expected


def test_packaged_default_bundle_is_the_repository_bundle() -> None:
    """The wheel ships a copy of policies/ (src/trustplane/policy/default_bundle): kept identical."""
    assert dict(default_bundle().files) == dict(load_dir(REPO_POLICIES).files)


def _with(source: BundleSource, name: str, text: str) -> BundleSource:
    return BundleSource({**source.files, name: text})


def test_a_policy_that_does_not_type_check_is_refused(default_source: BundleSource) -> None:
    bad = _with(
        default_source,
        "extra.cedar",
        '@id("bad.amount")\nforbid (principal, action == Action::"order:create", '
        'resource) when { context.amount_minor == "large" };',
    )
    with pytest.raises(BundleError) as caught:
        compile_bundle(bad)
    assert any(p.startswith("extra.cedar: bad.amount:") for p in caught.value.problems)
    with pytest.raises(PublishRefused) as refused:
        check_bundle(bad)
    assert all(p.startswith("validation: ") for p in refused.value.problems)


def test_an_unknown_attribute_is_refused(default_source: BundleSource) -> None:
    bad = _with(
        default_source,
        "extra.cedar",
        '@id("bad.attr")\npermit (principal, action == Action::"report:view", '
        'resource) when { resource.colour == "red" };',
    )
    with pytest.raises(BundleError, match=r"bad\.attr"):
        compile_bundle(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("permit (principal, action, resource);", "every policy needs a non-empty @id"),
        ('@id("")\npermit (principal, action, resource);', "every policy needs a non-empty @id"),
        ('@id("entity.own")\npermit (principal, action, resource);', "'entity.own' is used more"),
        ("permit (principal, action resource);", "does not parse"),
    ],
)
def test_id_rules_and_syntax(default_source: BundleSource, text: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        compile_bundle(_with(default_source, "extra.cedar", text))


def test_a_bad_schema_is_refused(default_source: BundleSource) -> None:
    with pytest.raises(BundleError, match=r"schema\.cedarschema"):
        compile_bundle(BundleSource({**default_source.files, "schema.cedarschema": "entity {"}))


def test_failing_bundle_tests_refuse_publication(default_source: BundleSource) -> None:
    files = dict(default_source.files)
    files["tests/default.yaml"] = files["tests/default.yaml"].replace(
        "reasons: [order.large_ticket_approval]", "reasons: [entity.own]", 1
    )
    with pytest.raises(PublishRefused) as refused:
        check_bundle(BundleSource(files))
    assert refused.value.problems == [
        "test tests/default.yaml: a large ticket without an approval is refused: "
        "expected reasons ['entity.own'], got ['order.large_ticket_approval']"
    ]


def test_a_bundle_without_tests_is_refused(default_source: BundleSource) -> None:
    files = {k: v for k, v in default_source.files.items() if not k.startswith("tests/")}
    with pytest.raises(PublishRefused, match="no test cases"):
        check_bundle(BundleSource(files))


def test_malformed_test_file_is_refused(default_source: BundleSource) -> None:
    with pytest.raises(PublishRefused, match=r"tests/x\.yaml: expected a mapping"):
        check_bundle(_with(default_source, "tests/x.yaml", "- just a list\n"))


def test_version_is_the_content_hash(tmp_path: Path, default_source: BundleSource) -> None:
    assert default_source.version == content_version(dict(reversed(default_source.files.items())))
    for name, text in default_source.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "README.md").write_text("not part of the bundle")
    (tmp_path / "tests" / "notes.txt").write_text("neither")
    assert load_dir(tmp_path).version == default_source.version
    (tmp_path / "tokens.cedar").write_text(default_source.files["tokens.cedar"] + "\n")
    assert load_dir(tmp_path).version != default_source.version


def test_load_dir_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a directory"):
        load_dir(tmp_path / "nope")
