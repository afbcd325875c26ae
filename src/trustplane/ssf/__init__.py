"""OpenID Shared Signals Framework 1.0: a transmitter of CAEP events about our tokens, and a receiver
that makes the tokens we derived from a partner's tokens inactive when the partner revokes them
(docs/ssf.md)."""
