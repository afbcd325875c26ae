"""Choosing the one audience and the scopes of a token (RFC 8707 resource indicators, RFC 6749 §3.3).

A token has exactly one audience. Each requested scope must be in the vocabulary, allowed for the
client, and accepted by that audience; nothing is granted by default.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from trustplane.clients.model import Client
from trustplane.errors import InvalidScopeError, InvalidTargetError
from trustplane.protocol.scopes import Vocabulary

MAX_SCOPES = 32


def select_resource(requested: list[str], client: Client, vocabulary: Vocabulary) -> str:
    if len(requested) > 1:
        raise InvalidTargetError("a token has exactly one audience: send one resource")
    if not requested:
        if len(client.allowed_resources) == 1:
            return client.allowed_resources[0]
        raise InvalidTargetError("resource is required: this client may use several audiences")
    resource = requested[0]
    try:
        parts = urlsplit(resource)
    except ValueError:
        raise InvalidTargetError("resource must be an absolute URI") from None
    if not parts.scheme or not parts.netloc or "#" in resource:
        raise InvalidTargetError("resource must be an absolute URI without a fragment")
    if resource not in vocabulary.resources or resource not in client.allowed_resources:
        raise InvalidTargetError("resource is not allowed for this client", debug=resource)
    return resource


def select_scopes(
    requested: str | None, client: Client, resource: str, vocabulary: Vocabulary
) -> tuple[str, ...]:
    if requested is None or not requested.strip():
        raise InvalidScopeError("scope is required")
    names = list(dict.fromkeys(requested.split()))
    if len(names) > MAX_SCOPES:
        raise InvalidScopeError("too many scopes")
    for name in names:
        if name not in vocabulary.scopes:
            raise InvalidScopeError(f"unknown scope {name!r}"[:200])
        if name not in client.scopes:
            raise InvalidScopeError(f"scope {name!r} is not allowed for this client")
        if not vocabulary.accepts(resource, name):
            raise InvalidScopeError(f"scope {name!r} is not accepted by resource {resource}")
    return tuple(names)
