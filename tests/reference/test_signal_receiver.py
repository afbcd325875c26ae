"""The settlement's poll receiver subscribing (:meth:`SignalReceiver.connect`) against a transmitter
answered by httpx's mock transport: the stream's ``iss`` must be the issuer (SSF 1.0 §8.1.1.1-2),
and the configuration's ``critical_subject_members`` are what its SETs are held to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.reference.test_signals import TRANSMITTER
from trustplane.outbound import OutboundFetcher
from trustplane.pep.client_auth import PrivateKeyJwt
from trustplane.reference.receiver import SignalReceiver
from trustplane.reference.signals import DESCRIPTION, SignalError
from trustplane.ssf.transmitter import POLL

ISSUER = "https://as.example"
CONFIGURATION = f"{ISSUER}/.well-known/ssf-configuration"


def transmitter(
    stream_iss: str = ISSUER, **config: Any
) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/.well-known/ssf-configuration":
            return httpx.Response(200, json={
                "issuer": ISSUER, "delivery_methods_supported": [POLL],
                "configuration_endpoint": f"{ISSUER}/ssf/stream", "jwks_uri": f"{ISSUER}/jwks",
                **config,
            })  # fmt: skip
        if path == "/.well-known/oauth-authorization-server":
            return httpx.Response(200, json={"issuer": ISSUER, "token_endpoint": f"{ISSUER}/token"})
        if path == "/token":
            return httpx.Response(200, json={"access_token": "at-1", "expires_in": 300})
        if path == "/ssf/stream" and request.method == "GET":
            return httpx.Response(200, json=[])
        if path == "/ssf/stream" and request.method == "POST":
            body = orjson.loads(request.content)
            assert body["description"] == DESCRIPTION
            return httpx.Response(201, json={
                **body, "stream_id": "s-1", "iss": stream_iss,
                "delivery": {"method": POLL, "endpoint_url": f"{ISSUER}/ssf/poll/s-1"},
            })  # fmt: skip
        return httpx.Response(404)

    return answer


def receiver(handler: Callable[[httpx.Request], httpx.Response]) -> SignalReceiver:
    auth = PrivateKeyJwt("c-ref", ec.generate_private_key(ec.SECP256R1()), "k", ISSUER)
    fetcher = OutboundFetcher(transport=httpx.MockTransport(handler))
    return SignalReceiver(None, CONFIGURATION, auth, fetcher, keys=TRANSMITTER)  # type: ignore[arg-type]


async def test_a_stream_naming_another_iss_is_refused() -> None:
    """SSF 1.0 §8.1.1.1-2: the receiver MUST check that a created or read stream's ``iss`` is the
    issuer it got the configuration from (it was not looked at: the subscription was made)."""
    made = receiver(transmitter(stream_iss="https://other.example"))
    with pytest.raises(SignalError, match="names another iss"):
        await made.connect()
    assert made.subscription is None
    assert made.verifier is None


async def test_the_subscription_keeps_the_critical_subject_members() -> None:
    made = receiver(transmitter(critical_subject_members=["user", "session"]))
    subscription = await made.connect()
    assert (subscription.stream_id, subscription.poll_url) == ("s-1", f"{ISSUER}/ssf/poll/s-1")
    assert made.verifier is not None
    assert made.verifier.critical == frozenset({"user", "session"})
    plain = receiver(transmitter())
    await plain.connect()
    assert plain.verifier is not None
    assert plain.verifier.critical == frozenset()
