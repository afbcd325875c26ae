"""DPoP at the pushed authorization request endpoint (RFC 9449 §10.1), as an
:attr:`trustplane.authorize.http.AuthorizeHttp.par_checks` entry.

A ``DPoP`` header at ``/par`` is verified like one at the token endpoint (``htm`` POST, ``htu`` the
PAR endpoint, ``iat`` window, ``jti`` single use, nonce when required) and its key becomes the
request's ``dpop_jkt``, so the code it yields is redeemed only with a proof of the same key
(``authorize.grants``). A request that also sends ``dpop_jkt`` must name that same key:
``invalid_dpop_proof`` otherwise. Without the header, ``dpop_jkt`` (if sent) is used as it is.
"The request" is the pushed one: the request object's parameters when ``request`` is sent (RFC
9126 §3), so the key is compared with (or becomes) the object's ``dpop_jkt``, not one beside it.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from trustplane.authorize.http import ParBinding, ParCheck
from trustplane.clients.model import Client
from trustplane.dpop.errors import InvalidDpopProofError
from trustplane.dpop.proof import DpopVerifier
from trustplane.protocol.form import Form


def dpop_at_par(verifier: DpopVerifier, par_url: str) -> ParCheck:
    """``par_url``: the public URL of ``/par`` (a proof's ``htu``)."""

    async def check(request: Request, _client: Client, _form: Form) -> ParBinding | None:
        proofs = request.headers.getlist("dpop")
        if not proofs:
            return None
        proof = await verifier.verify_for_token_endpoint(proofs, request.method, par_url)

        def bind(params: Form) -> None:
            claimed = params.get("dpop_jkt")
            if claimed is None:
                params.supply("dpop_jkt", proof.jkt)
            elif not hmac.compare_digest(claimed.encode(), proof.jkt.encode()):
                raise InvalidDpopProofError(
                    "dpop_jkt is not the thumbprint of the DPoP proof's key",
                    debug="dpop_jkt_mismatch",
                )

        return bind

    return check
