"""The two wire errors of RFC 9449, one class per ``error`` code (the Authlib pattern).

At the token endpoint they are RFC 6749 §5.2 answers (400, JSON body). At a resource server the PEP
answers 401 with a ``WWW-Authenticate: DPoP`` challenge carrying the same code (RFC 9449 §7.1, §9).
"""

from __future__ import annotations

from trustplane.errors import OAuth2Error


class InvalidDpopProofError(OAuth2Error):
    """RFC 9449 §5, §7.1, §12.2: the ``DPoP`` header is missing, repeated or malformed, or the proof
    fails a check of §4.3 (type, algorithm, key, signature, ``jti``, ``htm``, ``htu``, ``iat``,
    ``ath``, replay). ``debug`` holds a short reason slug for logs and metrics."""

    error = "invalid_dpop_proof"


class UseDpopNonceError(OAuth2Error):
    """RFC 9449 §8, §9, §12.2: the server requires a nonce of its own in the proof and the proof has
    none, or one this deployment no longer (or never) issued. The fresh nonce travels in the
    ``DPoP-Nonce`` response header; the client retries with a new proof carrying it."""

    error = "use_dpop_nonce"

    def __init__(self, nonce: str, description: str, *, debug: str = "") -> None:
        super().__init__(description, debug=debug, headers={"DPoP-Nonce": nonce})
        self.nonce = nonce
