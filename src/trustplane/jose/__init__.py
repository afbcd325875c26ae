"""The JOSE primitives on the hot path: compact JWS signing and verification over ``cryptography``.

joserfc handles key import, generation and thumbprints (off the hot path); this package only does what
the benchmark showed the generic library paying 1.5-2x for: sign and verify a compact JWS.
"""
