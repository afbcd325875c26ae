"""The ``client_credentials`` grant (RFC 6749 §4.4): the client acts for itself, ``sub`` =
``client_id``; RFC 9396 ``authorization_details`` of the types the client registered."""

from __future__ import annotations

from typing import Any, ClassVar

from trustplane.clients.authentication import AuthenticatedClient
from trustplane.clients.model import Client
from trustplane.clients.resources import select_resource, select_scopes
from trustplane.grant.contract import Granted, TokenIssuer
from trustplane.policy.enforcement import TokenPolicy
from trustplane.protocol.form import Form
from trustplane.protocol.scopes import Vocabulary
from trustplane.rar.registry import AuthorizationDetailsRegistry


class ClientCredentialsGrant:
    grant_type: ClassVar[str] = "client_credentials"
    label: ClassVar[str] = "client_credentials"

    def __init__(
        self,
        *,
        tokens: TokenIssuer,
        policy: TokenPolicy,
        vocabulary: Vocabulary,
        details: AuthorizationDetailsRegistry,
    ) -> None:
        self._tokens, self._policy = tokens, policy
        self._vocabulary, self._details = vocabulary, details

    async def handle(self, form: Form, auth: AuthenticatedClient) -> Granted:
        client = auth.client
        resource = select_resource(form.get_all("resource"), client, self._vocabulary)
        scopes = select_scopes(form.get("scope"), client, resource, self._vocabulary)
        details = self._requested_details(form, client)
        decisions = self._policy.check(client, scopes, resource, self.grant_type)
        extra: dict[str, Any] = {"lei": client.lei}
        if details:
            extra["authorization_details"] = list(details)
        token = self._tokens.issue(
            subject=client.client_id,
            client_id=client.client_id,
            audience=resource,
            scopes=scopes,
            extra=extra,
        )
        if not details:
            return Granted(token=token, decisions=decisions)
        return Granted(
            token=token,
            decisions=decisions,
            response={"authorization_details": list(details)},  # RFC 9396 §7
            details_digest=self._details.digest(details),
        )

    def _requested_details(self, form: Form, client: Client) -> tuple[dict[str, Any], ...]:
        """RFC 9396 §6: on client_credentials the client's own registration (its
        ``authorization_details_types``) decides; an unknown or unregistered type, or malformed
        details, is ``invalid_authorization_details`` (§5), never silently dropped."""
        raw = form.get("authorization_details")
        if raw is None:
            return ()
        return self._details.validate(raw, client)
