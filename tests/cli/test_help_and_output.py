"""Issue 11 item 13, the command line's own words: flags are flags in ``--help`` (no ``<bool>``),
``serve --help`` shows its defaults, and ``audit verify`` says only the failure when one fails."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import cast

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.core import TyperGroup
from typer.testing import CliRunner, Result

from tests.audit.ledger_helpers import event
from trustplane.audit import merkle
from trustplane.audit.canonical import entry_parts
from trustplane.audit.export_format import export_line
from trustplane.audit.note import Checkpoint, Signer
from trustplane.audit.store import StoredEntry
from trustplane.cli import app


def every_command(group: TyperGroup, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, command in group.commands.items():
        if isinstance(command, TyperGroup):
            found += every_command(command, (*path, name))
        else:
            found.append((*path, name))
    return found


COMMANDS = every_command(cast(TyperGroup, typer.main.get_command(app)))


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_covered() -> None:
    assert len(COMMANDS) > 50
    assert ("audit", "verify") in COMMANDS
    assert ("serve",) in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "trustplane")
def test_flags_are_shown_as_flags(command: tuple[str, ...]) -> None:
    text = help_text(*command)

    assert "<bool>" not in text
    assert "--help" in text


def test_a_boolean_option_shows_both_of_its_forms() -> None:
    assert "--proofs / --no-proofs" in help_text("audit", "export")
    assert "--json " in help_text("keys", "list")


def test_serve_help_shows_the_defaults() -> None:
    text = help_text("serve")

    assert "[default: (TRUSTPLANE_HOST, else 127.0.0.1)]" in text
    assert "[default: (TRUSTPLANE_PORT, else 8000)]" in text
    assert "[default: (TRUSTPLANE_WORKERS, else 1)]" in text


def test_the_root_help_names_the_data_directory_option() -> None:
    assert "--data-dir" in help_text()


@pytest.fixture
def export(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A ten-entry export, its signed checkpoint and the verifier key, as files."""
    signer = Signer("log.example/audit", ed25519.Ed25519PrivateKey.generate())
    builder = merkle.TreeBuilder(0, {})
    lines = []
    for n in range(10):
        entry, payload, salt = entry_parts(event(n))
        leaf = merkle.leaf_hash(entry)
        builder.append(leaf)
        lines.append(export_line(StoredEntry(n, entry.decode(), leaf, payload.decode(), salt)))
    (tmp_path / "export.jsonl").write_bytes(b"".join(lines))
    (tmp_path / "checkpoint.txt").write_text(
        signer.sign(Checkpoint(signer.name, 10, builder.root()).body())
    )
    (tmp_path / "key.txt").write_text(signer.verifier_key)
    return tmp_path / "export.jsonl", tmp_path / "checkpoint.txt", tmp_path / "key.txt"


def verify(export: tuple[Path, Path, Path]) -> Result:
    data, checkpoint, key = export
    args = ["audit", "verify", str(data), "--checkpoint", str(checkpoint), "--public-key", str(key)]
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def test_a_verified_export_says_how_long_it_took(export: tuple[Path, Path, Path]) -> None:
    result = verify(export)

    assert result.exit_code == 0, result.output
    assert "verified in " in result.stderr
    assert "FAILED" not in result.stdout


def test_a_failed_verification_says_only_the_failure(export: tuple[Path, Path, Path]) -> None:
    data = export[0]
    data.write_bytes(data.read_bytes().replace(b'"decision":"allow"', b'"decision":"deny"', 1))

    result = verify(export)

    assert result.exit_code == 1
    assert "FAILED" in result.stdout
    assert "verified" not in result.stdout + result.stderr


REPO = Path(__file__).resolve().parents[2]


def walk_through_outputs() -> list[str]:
    """Every file the README's walk-throughs write (``--out DIR``, ``| tee FILE``), as written."""
    readme = (REPO / "README.md").read_text()
    sections = [s for s in readme.split("\n## ") if s.startswith("Walk-through")]
    assert len(sections) >= 2
    blocks = [b.split("```")[0] for s in sections for b in s.split("```sh\n")[1:]]
    written = [m for b in blocks for m in re.findall(r"\| tee (\S+)", b)]
    folders = [m for b in blocks for m in re.findall(r"--out (\S+)", b)]
    return written + [f"{folder}/jwks.json" for folder in folders]  # keygen writes jwks.json there


def test_the_walk_throughs_write_only_where_git_ignores() -> None:
    """Run from the repository root (where `make serve` keeps .trustplane/), the walk-throughs must
    not leave files git would offer to commit."""
    outputs = walk_through_outputs()
    assert {"work/client/jwks.json", "work/registration.json", "work/token.json"} <= set(outputs)
    for path in outputs:
        ignored = subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", path], cwd=REPO, check=False
        )
        assert ignored.returncode == 0, f"{path} is not ignored by .gitignore"
