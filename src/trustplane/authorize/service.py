"""The authorization endpoint's decisions, framework-free: validate the request, describe what
would be granted, and on approval create (or reuse) the mandate and issue the code.

Codes: 256-bit random, stored as SHA-256, valid ``authorization_code_lifetime`` seconds (at most 60),
bound to the client, the redirect URI, the PKCE challenge, the resource, the scopes, the
authorization details, the user and the mandate version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.ext.asyncio import AsyncConnection

from trustplane import metrics
from trustplane.audit.sink import AuditSink, write_events
from trustplane.audit_events import AuditEvent, AuditEventType
from trustplane.authorize import consent_text
from trustplane.authorize.answers import Answer, AnswerStore
from trustplane.authorize.consent_text import Instruction, Item, humanise
from trustplane.authorize.login import Identity
from trustplane.authorize.par import InvalidRequestUriError, PushedRequests
from trustplane.authorize.redirects import match_redirect_uri
from trustplane.authorize.request import (
    AuthorizationRequest,
    ErrorPage,
    Gate,
    Redirect,
    RedirectError,
    parse_request,
)
from trustplane.authorize.request_object import InvalidRequestObjectError, RequestObjects
from trustplane.authorize.store import CodeStore, GrantContext, grant_event, new_secret_value
from trustplane.clients.model import Client
from trustplane.clients.resources import select_resource, select_scopes
from trustplane.clients.service import ClientRegistry
from trustplane.entities.service import EntityDirectory
from trustplane.errors import (
    AccessDeniedError,
    InvalidRequestError,
    OAuth2Error,
    UnauthorizedClientError,
    wire_description,
)
from trustplane.mandates.model import Mandate
from trustplane.mandates.service import MandateService
from trustplane.profile import client_is_fapi2
from trustplane.protocol.form import Form
from trustplane.protocol.scopes import Vocabulary
from trustplane.rar.registry import AuthorizationDetailsRegistry
from trustplane.settings import Settings
from trustplane.storage.db import Database


@dataclass(frozen=True, slots=True)
class ConsentView:
    """Everything the consent page states, in business language; identifiers ride as ``code``."""

    client_name: str
    client_id: str
    client_entity: Item
    resource: Item
    scopes: list[Item]
    details: list[Instruction]
    effective_from: str
    effective_until: str
    user_name: str
    user_entity: Item
    covering: dict[str, Any] | None


def _day(ts: int | None) -> str:
    if ts is None:
        return "open-ended (until revoked)"
    return datetime.fromtimestamp(ts, UTC).strftime("%d %b %Y %H:%M UTC")


def with_params(uri: str, params: dict[str, str | None]) -> str:
    """Add query parameters to a redirect URI that may already have a query (RFC 6749 §3.1.2)."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{uri}{'&' if '?' in uri else '?'}{query}"


def _par_message(exc: ErrorPage) -> str:
    """The developer-facing text of a phase-1 failure at ``/par`` (the page text is for people)."""
    if "redirect_uri" in exc.debug:  # missing (several registered) or not registered
        return "redirect_uri is missing or not registered for this client"
    return exc.message


class AuthorizationService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        registry: ClientRegistry,
        vocabulary: Vocabulary,
        details: AuthorizationDetailsRegistry,
        mandates: MandateService,
        codes: CodeStore,
        audit: AuditSink,
        entities: EntityDirectory,
        pushed: PushedRequests,
        objects: RequestObjects,
        answers: AnswerStore,
    ) -> None:
        self._settings, self._db, self._registry = settings, db, registry
        self._vocabulary, self._details, self._mandates = vocabulary, details, mandates
        self._codes, self._audit, self._entities = codes, audit, entities
        self._pushed, self._objects, self._answers = pushed, objects, answers

    def parse(self, form: Form) -> AuthorizationRequest:
        """Plain parameters only (no ``request``/``request_uri``); see :meth:`resolve`."""
        return parse_request(form, self._registry, self._vocabulary, self._details)

    # ------------------------------------------------------------------ PAR and JAR

    async def resolve(self, form: Form) -> AuthorizationRequest:
        """``/authorize``: a pushed request (``request_uri``, RFC 9126 §4), a request object
        (``request``, RFC 9101 §5), or plain parameters (refused when the deployment or the client
        requires PAR or signed request objects).

        Errors before the redirect URI is known to be the client's are :class:`ErrorPage`: a bad
        ``request_uri`` (the redirect URI is inside what it names) and a request object that does
        not verify (its redirect URI cannot be trusted). After that they are redirected."""
        request_uri, request_object = form.get("request_uri"), form.get("request")
        if request_uri is not None and request_object is not None:
            raise ErrorPage(
                "The request carries both a request_uri and a request object.",
                error="invalid_request",
            )
        if request_uri is None and request_object is None:
            return parse_request(
                form, self._registry, self._vocabulary, self._details, gate=self._gate(False)
            )
        client = self._named_client(form)
        if request_uri is not None:
            try:
                pending = await self._pushed.redeem(request_uri, client.client_id)
            except InvalidRequestUriError as exc:
                raise ErrorPage(
                    "This sign-in link is not valid: it has expired, was already used, or was "
                    "not issued to this application. Start again from the application.",
                    debug=exc.debug,
                    error=exc.error,
                ) from None
            self.still_allowed(pending)  # disabled or its registration changed since the push
            return pending
        assert request_object is not None
        try:
            params = await self._objects.verify(request_object, client)
        except InvalidRequestObjectError as exc:
            raise ErrorPage(
                "The signed request of the application could not be accepted.",
                debug=exc.debug,
                error=exc.error,
            ) from None
        request = parse_request(
            params,
            self._registry,
            self._vocabulary,
            self._details,
            client_id=client.client_id,
            gate=self._gate(True),
        )
        return replace(request, signed=True)

    def _named_client(self, form: Form) -> Client:
        """RFC 9101 §5 / RFC 9126 §4: ``client_id`` is sent beside ``request``/``request_uri``."""
        client_id = form.get("client_id")
        if client_id is None:
            raise ErrorPage(
                "The request does not say which application is asking (client_id).",
                error="invalid_request",
            )
        client = self._registry.get(client_id)
        if client is None or not client.active:
            raise ErrorPage(
                "The application that sent you here is not known.", debug=client_id[:200]
            )
        return client

    def _gate(self, signed: bool) -> Gate:
        """What a request that did not come through ``/par`` must satisfy."""

        def gate(client: Client, target: Redirect) -> None:
            # the fapi2 profile (deployment or client): FAPI 2.0 Security Profile §5.3.2.2
            fapi2 = client_is_fapi2(self._settings, client.metadata)
            if fapi2 or self._pushed.required(client.metadata):
                raise RedirectError(
                    target,
                    InvalidRequestError(
                        "this client must push its authorization requests "
                        "(pushed_authorization_request_endpoint)"
                    ),
                )
            if not signed and self._objects.required(client):
                raise RedirectError(
                    target, InvalidRequestError("this client must send a signed request object")
                )

        return gate

    async def push(
        self, form: Form, client: Client, bindings: Sequence[Callable[[Form], None]] = ()
    ) -> tuple[str, int]:
        """``/par`` (RFC 9126 §2): validate as ``/authorize`` would, store, return the
        ``request_uri`` and its ``expires_in``. Errors are the RFC 6749 §5.2 JSON ones.
        ``bindings`` (what the ``/par`` checks proved, e.g. a DPoP proof's key) apply to the
        parameters that are stored: the request object's when one is sent, not the form beside it."""
        if "request_uri" in form:  # RFC 9126 §2.1
            raise InvalidRequestError(
                "request_uri must not be sent to the pushed authorization request endpoint"
            )
        if form.get("client_id") not in (None, client.client_id):
            raise InvalidRequestError("client_id is not the authenticated client")
        raw = form.get("request")
        if raw is not None:
            params = await self._objects.verify(raw, client)
        elif self._objects.required(client):
            raise InvalidRequestError("this client must send a signed request object (request)")
        else:
            params = form
        for bind in bindings:
            bind(params)
        try:
            request = parse_request(
                params,
                self._registry,
                self._vocabulary,
                self._details,
                client_id=client.client_id,
            )
        except ErrorPage as exc:  # RFC 9126 §2.1: the redirect_uri is checked here
            raise InvalidRequestError(_par_message(exc), debug=exc.debug) from None
        except RedirectError as exc:
            raise exc.error from None
        if not request.redirect_uri_given and client_is_fapi2(self._settings, client.metadata):
            # FAPI 2.0 Security Profile §5.3.2.2: redirect_uri is required in the pushed request
            raise InvalidRequestError("redirect_uri is required under the fapi2 profile")
        return await self._pushed.push(replace(request, signed=raw is not None))

    def client(self, request: AuthorizationRequest) -> Client:
        client = self._registry.get(request.client_id)
        if client is None or not client.active:  # disabled while the user was on the page
            raise ErrorPage("The application that sent you here is no longer available.")
        return client

    def still_allowed(self, request: AuthorizationRequest) -> Client:
        """A request validated earlier (pushed, or waiting on the login or consent page), checked
        again against the client's registration as it is now (RFC 9126 §4: validation done at the
        push may be skipped only while the registration has not changed in a way that affects it;
        RFC 7592 lets the client replace its metadata meanwhile). A redirect URI no longer
        registered is an :class:`ErrorPage` (RFC 6749 §4.1.2.1: never redirected to); a grant,
        resource, scope or ``authorization_details`` type no longer allowed is a
        :class:`RedirectError` with the code ``/authorize`` would have given, also for a request
        that was not signed when signed request objects are now required (RFC 9101 §10.5, the
        deployment's or the client's ``require_signed_request_object``)."""
        client = self.client(request)
        target = request.target
        if (
            match_redirect_uri(target.redirect_uri, client.metadata.get("redirect_uris", ()))
            is None
        ):
            raise ErrorPage(
                "The return address of this request is no longer registered for the application.",
                debug=f"redirect_uri since removed: {target.redirect_uri[:300]!r}",
            )
        try:
            if "authorization_code" not in client.grant_types:
                raise UnauthorizedClientError(
                    "this client may not use the authorization_code grant"
                )
            select_resource([request.resource], client, self._vocabulary)
            select_scopes(" ".join(request.scopes), client, request.resource, self._vocabulary)
            if request.authorization_details:
                self._details.validate(list(request.authorization_details), client)
            if not request.signed and self._objects.required(client):
                raise InvalidRequestError("this client must send a signed request object")
        except OAuth2Error as exc:
            raise RedirectError(target, exc) from None
        return client

    # ------------------------------------------------------------------ responses

    def error_redirect(self, target: Redirect, exc: OAuth2Error) -> str:
        """RFC 6749 §4.1.2.1 error response, with ``iss`` (RFC 9207 §2)."""
        metrics.PROTOCOL_ERRORS.labels(endpoint="authorization", error=exc.error).inc()
        return with_params(
            target.redirect_uri,
            {
                "error": exc.error,
                "error_description": wire_description(exc.description) or None,
                "state": target.state,
                "iss": self._settings.issuer,
            },
        )

    async def refused(
        self, target: Redirect | None, exc: OAuth2Error | ErrorPage, client_id: str | None = None
    ) -> None:
        """Audit a refused authorization request (error page, error redirect, or ``/par``)."""
        reason = exc.error if isinstance(exc, OAuth2Error) else (exc.error or "error_page")
        await self._audit.emit(
            AuditEvent(
                type=AuditEventType.AUTHORIZATION_REFUSED,
                issuer=self._settings.issuer,
                client_id=target.client_id if target else client_id,
                decision="deny",
                reason=reason,
                payload={"detail": exc.debug[:500]},
            )
        )

    # ------------------------------------------------------------------ consent

    async def consent_view(self, request: AuthorizationRequest, who: Identity) -> ConsentView:
        client = self.client(request)
        covering = await self._covering(request, who)
        now = int(time.time())
        until = None if covering is not None else self._default_until(now)
        details = request.authorization_details
        leis = {who.lei, client.lei, *consent_text.leis_in(self._details, details)}
        names = await self._entities.lookup(leis)
        described = self._vocabulary.resources.get(request.resource)
        return ConsentView(
            client_name=str(client.metadata.get("client_name") or client.client_id),
            client_id=client.client_id,
            client_entity=consent_text.entity(client.lei, names),
            resource=Item(described or request.resource, request.resource if described else None),
            scopes=[self._scope(s) for s in request.scopes],
            details=[consent_text.instruction(self._details, d, names) for d in details],
            effective_from=_day(covering.effective_from if covering else now),
            effective_until=_day(covering.effective_until if covering else until),
            user_name=who.display_name,
            user_entity=consent_text.entity(who.lei, names),
            covering=None if covering is None else {"id": covering.id, "version": covering.version},
        )

    def _scope(self, name: str) -> Item:
        entry = self._vocabulary.scopes.get(name)
        return Item(entry.description if entry and entry.description else humanise(name), name)

    async def requester(self, request: AuthorizationRequest) -> tuple[str, Item]:
        """The client's name and its legal entity (name from the entity directory), for the
        login page."""
        client = self.client(request)
        names = await self._entities.lookup({client.lei})
        name = str(client.metadata.get("client_name") or client.client_id)
        return name, consent_text.entity(client.lei, names)

    def _default_until(self, now: int) -> int:
        return now + self._settings.mandate_default_lifetime

    async def _covering(self, request: AuthorizationRequest, who: Identity) -> Any:
        """A mandate this person granted, or one of their legal entity as a whole."""
        return await self._mandates.find_covering(
            who.lei,
            request.client_id,
            request.scopes,
            request.authorization_details,
            grantor_person=who.user_id,
        )

    async def approve(self, request: AuthorizationRequest, who: Identity, answer: Answer) -> str:
        """Reuse the mandate that covers the request, or create one from this consent; issue the
        code bound to that mandate version; return the redirect with ``code``, ``state``, ``iss``.
        The request is checked against the registration as it is now (:meth:`still_allowed`).

        One transaction: the claim of ``answer`` (first: :class:`ErrorPage` if the request was
        already answered, see :mod:`trustplane.authorize.answers`), the new mandate, the code and
        its audit events; a refused or failed approval writes none of them."""
        client = self.still_allowed(request)
        covering = await self._covering(request, who)
        async with self._db.transaction() as conn:
            await self._claim(conn, answer)
            mandate = covering or await self._mandates.create_from_consent(
                grantor_lei=who.lei,
                grantor_person=who.user_id,
                client=client,
                scopes=request.scopes,
                authorization_details=request.authorization_details,
                accepted_by=who.user_id,
                effective_until=self._default_until(int(time.time())),
                conn=conn,
            )
            code = await self._issue(conn, request, who, client, mandate, covering is not None)
        metrics.AUTHORIZATIONS.labels(outcome="approved").inc()
        return with_params(
            request.target.redirect_uri,
            {"code": code, "state": request.target.state, "iss": self._settings.issuer},
        )

    async def _claim(self, conn: AsyncConnection, answer: Answer) -> None:
        """RFC 6749 §4.1.2.1 leaves no second answer: the one authorization response of this
        request was sent (or is being sent) already, so a second is refused with the page an
        expired request gets, not a second response to the client with the same ``state``."""
        if not await self._answers.claim(conn, answer.request_id, answer.expires_at):
            raise ErrorPage(
                "This request was already answered. Start again from the application.",
                debug=f"consent form posted again (request {answer.request_id})",
            )

    async def _issue(
        self,
        conn: AsyncConnection,
        request: AuthorizationRequest,
        who: Identity,
        client: Client,
        mandate: Mandate,
        reused: bool,
    ) -> str:
        """The code bound to ``mandate`` and its two audit events, in the caller's transaction."""
        grant = GrantContext(
            client.client_id,
            who.user_id,
            who.lei,
            mandate.id,
            mandate.version,
            request.resource,
            request.scopes,
            request.authorization_details,
            who.auth_time,
            who.acr,
        )
        code = new_secret_value()
        now = int(time.time())
        event = self._event(AuditEventType.CONSENT_GRANTED, grant, reused_mandate=reused)
        await self._codes.create(
            conn,
            code,
            grant,
            redirect_uri=request.target.redirect_uri,
            redirect_uri_given=request.redirect_uri_given,
            code_challenge=request.code_challenge,
            expires_at=now + self._settings.authorization_code_lifetime,
            dpop_jkt=request.dpop_jkt,  # RFC 9449 §10
        )
        await write_events(conn, [event, self._event(AuditEventType.CODE_ISSUED, grant)])
        return code

    async def deny(self, request: AuthorizationRequest, who: Identity, answer: Answer) -> str:
        """The ``access_denied`` redirect; the claim of ``answer`` and the audit event in one
        transaction (a second answer of the same request is refused: :meth:`_claim`)."""
        event = AuditEvent(
            type=AuditEventType.CONSENT_DENIED,
            issuer=self._settings.issuer,
            subject=who.user_id,
            client_id=request.client_id,
            audience=request.resource,
            scopes=request.scopes,
            authorization_details_digest=self._details.digest(request.authorization_details),
            decision="deny",
            reason="access_denied",
        )
        async with self._db.transaction() as conn:
            await self._claim(conn, answer)
            await write_events(conn, [event])
        metrics.AUTHORIZATIONS.labels(outcome="denied").inc()
        denied = AccessDeniedError("the resource owner denied the request")
        return self.error_redirect(request.target, denied)

    def _event(self, type_: AuditEventType, grant: GrantContext, **payload: Any) -> AuditEvent:
        return grant_event(
            type_,
            grant,
            issuer=self._settings.issuer,
            details_digest=self._details.digest(grant.authorization_details),
            decision="allow",
            payload={"acr": grant.acr, **payload},
        )


__all__ = ["AuthorizationService", "ConsentView", "ErrorPage", "RedirectError"]
