"""The imported-key cache of ``events.signed``: a verification follows the JWKS it is given (a
rotated, added or removed key takes effect on the next event), never a key kept from an earlier
set, and a tampered event is refused whether its set was imported before or not."""

from __future__ import annotations

import pytest

from trustplane.events import signed
from trustplane.reference.events import Envelope, EventRefused, EventSigner, verify_event

ISSUER = "https://execution.example"


def event(signer: EventSigner) -> str:
    return signer.sign("trade.executed", "t-1", "execute", "executed", Envelope("x", "s", "c"))[1]


def tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    flipped = "A" if payload[7] != "A" else "B"
    return f"{head}.{payload[:7]}{flipped}{payload[8:]}.{signature}"


def test_a_rotated_set_verifies_with_the_new_key_and_not_the_removed_one() -> None:
    old, new = EventSigner.generate(ISSUER), EventSigner.generate(ISSUER)
    assert verify_event(event(old), old.jwks(), issuer=ISSUER)["iss"] == ISSUER
    rotated = {"keys": [new.public_jwk()]}
    assert verify_event(event(new), rotated, issuer=ISSUER)["iss"] == ISSUER
    with pytest.raises(EventRefused, match="does not verify"):
        verify_event(event(old), rotated, issuer=ISSUER)  # its kid left the set
    both = {"keys": [old.public_jwk(), new.public_jwk()]}
    assert verify_event(event(old), both, issuer=ISSUER)["iss"] == ISSUER


def test_a_kid_whose_key_changed_verifies_only_with_the_key_now_published() -> None:
    old, new = EventSigner.generate(ISSUER), EventSigner.generate(ISSUER)
    assert verify_event(event(old), old.jwks(), issuer=ISSUER)["iss"] == ISSUER
    # The same kid, other key material: the set's content differs, so it is imported afresh.
    swapped = {"keys": [{**new.public_jwk(), "kid": old.kid}]}
    with pytest.raises(EventRefused, match="does not verify"):
        verify_event(event(old), swapped, issuer=ISSUER)


def test_a_set_mutated_in_place_is_seen_as_the_set_it_became() -> None:
    old, new = EventSigner.generate(ISSUER), EventSigner.generate(ISSUER)
    jwks = old.jwks()
    assert verify_event(event(old), jwks, issuer=ISSUER)["iss"] == ISSUER
    jwks["keys"] = [new.public_jwk()]
    with pytest.raises(EventRefused, match="does not verify"):
        verify_event(event(old), jwks, issuer=ISSUER)
    assert verify_event(event(new), jwks, issuer=ISSUER)["iss"] == ISSUER


def test_a_tampered_event_is_refused_with_a_cached_set() -> None:
    signer = EventSigner.generate(ISSUER)
    jwks = signer.jwks()
    good = event(signer)
    for _ in range(2):  # the second round meets the imported set
        assert verify_event(good, jwks, issuer=ISSUER)["iss"] == ISSUER
        with pytest.raises(EventRefused, match="does not verify"):
            verify_event(tampered(good), jwks, issuer=ISSUER)


def test_the_cache_is_bounded_and_a_set_is_imported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    imported: list[object] = []
    real = signed.import_public_jwks

    def counting(jwks: object) -> object:
        imported.append(jwks)
        return real(jwks)

    monkeypatch.setattr(signed, "import_public_jwks", counting)
    signer = EventSigner.generate(ISSUER)
    for _ in range(3):
        verify_event(event(signer), signer.jwks(), issuer=ISSUER)
    assert len(imported) == 1
    for _ in range(signed.MAX_CACHED_SETS + 5):
        other = EventSigner.generate(ISSUER)
        verify_event(event(other), other.jwks(), issuer=ISSUER)
    assert len(signed._SETS) <= signed.MAX_CACHED_SETS


def test_an_unusable_set_is_refused_every_time() -> None:
    signer = EventSigner.generate(ISSUER)
    broken = {"keys": [{**signer.public_jwk(), "d": "secret"}]}
    for _ in range(2):
        with pytest.raises(EventRefused, match="unusable JWKS"):
            verify_event(event(signer), broken, issuer=ISSUER)
