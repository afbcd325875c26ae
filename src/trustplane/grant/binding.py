"""What a token request binds its tokens to (RFC 9449 DPoP, RFC 8705 mutual TLS), decided once by
the token endpoint before the grant runs, for every grant.

The endpoint verifies the request's ``DPoP`` proof (if any) and looks at the client's certificate
(:func:`trustplane.oauth.certificate_binding.certificate_confirmation`), builds one :class:`Binding`
and makes it current for the grant (:func:`bound`). :class:`trustplane.grant.contract.TokenIssuer`
puts ``Binding.cnf`` into every access token it signs while it is current, so no grant has to know
about binding; grants that keep something for later (a refresh token, RFC 9449 §5; an
authorization code's ``dpop_jkt``, §10) read :func:`current_binding`.

Both a DPoP proof and a certificate binding: the token carries both confirmation members
(``cnf.jkt`` and ``cnf.x5t#S256``) and is a ``DPoP`` token. RFC 9449 and RFC 8705 do not forbid it;
a resource server checks every member it finds (the PEP SDK does), so neither protection is
dropped silently. ``Binding.kind`` is what a profile rule checks ("sender-constrained tokens
required": ``binding.kind != "none"``), and the label of the issuance metric.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from trustplane.dpop.proof import DpopProof
from trustplane.grant.outcomes import Condition

BindingKind = Literal["none", "dpop", "mtls", "dpop+mtls"]


@dataclass(frozen=True, slots=True)
class Binding:
    """``cnf``: the RFC 7800 confirmation claim of every access token issued for the request (None:
    a bearer token). ``proof``: the verified DPoP proof; ``conditions``: what the outcome's
    transaction must find true (the proof ``jti``'s first use, when it is consumed there)."""

    cnf: dict[str, str] | None = None
    proof: DpopProof | None = None
    conditions: tuple[Condition, ...] = ()

    @property
    def kind(self) -> BindingKind:
        if self.cnf is None:
            return "none"
        dpop, mtls = "jkt" in self.cnf, "x5t#S256" in self.cnf
        if dpop and mtls:
            return "dpop+mtls"
        return "dpop" if dpop else "mtls"

    @property
    def jkt(self) -> str | None:
        """The DPoP key's thumbprint the tokens are bound to (None: not DPoP-bound)."""
        return None if self.cnf is None else self.cnf.get("jkt")

    @property
    def token_type(self) -> str:
        """RFC 9449 §5: ``DPoP`` for a DPoP-bound token; RFC 8705 keeps ``Bearer``."""
        return "DPoP" if self.jkt is not None else "Bearer"

    def claims(self) -> dict[str, Any]:
        return {} if self.cnf is None else {"cnf": dict(self.cnf)}

    def audit(self) -> dict[str, Any]:
        """What the issue record names: the binding kind and the ``cnf`` thumbprint(s)."""
        return {} if self.cnf is None else {"binding": self.kind, "cnf": dict(self.cnf)}


UNBOUND = Binding()

_current: ContextVar[Binding] = ContextVar("trustplane_token_binding", default=UNBOUND)


def current_binding() -> Binding:
    """The binding of the token request being handled (``UNBOUND`` outside one)."""
    return _current.get()


@contextmanager
def bound(binding: Binding) -> Iterator[None]:
    """Make ``binding`` current while a grant runs (the token endpoint only)."""
    token = _current.set(binding)
    try:
        yield
    finally:
        _current.reset(token)
