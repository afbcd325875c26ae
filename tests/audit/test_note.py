"""C2SP signed-note and tlog-checkpoint: the Go reference vector byte for byte, and the refusals."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustplane.audit.note import (
    Checkpoint,
    NoteError,
    Signer,
    Verifier,
    key_id,
    open_checkpoint,
    open_note,
)

GO: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "signed_note.json").read_text()
)


def go_signer() -> Signer:
    """The Go vector's private key: ``PRIVATE+KEY+name+hash+base64(0x01 || seed)``."""
    _, _, name, _hash, data = GO["signer_key"].split("+", 4)
    raw = base64.b64decode(data)
    assert raw[0] == 0x01
    return Signer(name, ed25519.Ed25519PrivateKey.from_private_bytes(raw[1:]))


def test_key_id_and_verifier_key_match_the_go_reference() -> None:
    signer = go_signer()
    assert signer.verifier_key == GO["verifier_key"]
    assert f"{key_id(signer.name, signer.public_key):08x}" == "c74f20a3"


def test_signed_note_matches_the_go_reference_byte_for_byte() -> None:
    assert go_signer().sign(GO["text"]) == GO["note"]


def test_the_go_note_opens_with_its_verifier_key() -> None:
    assert open_note(GO["note"], Verifier.parse(GO["verifier_key"])) == GO["text"]


def other_signer(name: str = "PeterNeumann") -> Signer:
    return Signer(name, ed25519.Ed25519PrivateKey.generate())


@pytest.mark.parametrize(
    ("note", "message"),
    [
        pytest.param(
            GO["note"].replace("cryptography", "cryptograph"), "does not verify", id="text-altered"
        ),
        pytest.param(
            GO["note"].replace("ZInNIuGU", "ZInNIuGV"), "does not verify", id="signature-altered"
        ),
        pytest.param(
            other_signer().sign(GO["text"]), "not signed by the expected key", id="other-key"
        ),
        pytest.param(
            other_signer("Else").sign(GO["text"]), "not signed by the expected key", id="other-name"
        ),
        pytest.param(GO["text"], "no signature block", id="unsigned"),
        pytest.param(GO["note"].rstrip("\n"), "does not end with a newline", id="no-final-newline"),
        pytest.param(
            GO["note"].replace("\u2014", "-"), "malformed signature line", id="no-em-dash"
        ),
        pytest.param(GO["note"].replace("x08go/", "x08go/!"), "not base64", id="bad-base64"),
    ],
)
def test_refused_notes(note: str, message: str) -> None:
    with pytest.raises(NoteError, match=message):
        open_note(note, Verifier.parse(GO["verifier_key"]))


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
        ("Peter+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
        (
            "PeterNeumann+c74f20a3+AhpcZQcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "not an Ed25519 key",
        ),
        ("PeterNeumann+c74f20a3+ARpc2QcU", "not an Ed25519 key"),
        ("PeterNeumann+c74f20a3", "must look like"),
        ("PeterNeumann c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "must look like"),
        ("PeterNeumann+c74f20a3+!!!", "not base64"),
    ],
)
def test_refused_verifier_keys(key: str, message: str) -> None:
    with pytest.raises(NoteError, match=message):
        Verifier.parse(key)


def test_checkpoint_body_is_the_c2sp_format() -> None:
    root = bytes(range(32))
    checkpoint = Checkpoint("example.com/log", 42, root)
    assert checkpoint.body() == f"example.com/log\n42\n{base64.b64encode(root).decode()}\n"
    assert Checkpoint.parse(checkpoint.body()) == checkpoint
    signer = other_signer("example.com/log")
    assert (
        open_checkpoint(signer.sign(checkpoint.body()), Verifier.parse(signer.verifier_key))
        == checkpoint
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("example.com/log\n42\n", "must have an origin"),
        ("example.com/log\n042\nAAAA\n", "must have an origin"),
        ("example.com/log\n-1\nAAAA\n", "must have an origin"),
        ("example.com/log\n42\nAAAA\n", "not 32 bytes"),
        ("example.com/log\n42\n!!!!\n", "not base64"),
    ],
)
def test_refused_checkpoints(body: str, message: str) -> None:
    with pytest.raises(NoteError, match=message):
        Checkpoint.parse(body)


def test_a_checkpoint_for_another_origin_is_refused() -> None:
    signer = other_signer("example.com/log")
    note = signer.sign(Checkpoint("example.com/other", 1, bytes(32)).body())
    with pytest.raises(NoteError, match="origin"):
        open_checkpoint(note, Verifier.parse(signer.verifier_key))
