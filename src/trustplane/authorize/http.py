"""The authorization endpoint's pages (server-rendered, Jinja2 with autoescape):

- ``GET|POST /authorize``: validate (error page or error redirect), then the login or consent page;
- ``POST /authorize/login``: check the credentials, 303 back to the flow;
- ``GET /authorize/continue``: the login or consent page for a pending request;
- ``POST /authorize/consent``: approve or deny, 303 to the client's redirect URI;
- ``POST /par``: pushed authorization requests (RFC 9126), JSON like the token endpoint.

``/authorize`` takes plain parameters, a ``request_uri`` from ``/par``, or a signed ``request``
object (RFC 9101): :meth:`AuthorizationService.resolve`.

Every page: ``Cache-Control: no-store``, ``Content-Security-Policy`` with ``frame-ancestors 'none'``
(and ``X-Frame-Options: DENY``), ``Referrer-Policy: no-referrer``. Every form carries a CSRF token
bound to the session cookie; a POST without it (or with a wrong one) gets a 403 page and changes
nothing. Every POST answers 303.

The session cookie (``__Host-`` prefixed when the issuer is https) is sealed, ``HttpOnly``,
``SameSite=Lax``, ``Secure`` unless the issuer is plain http on loopback. The pending request rides
in a sealed hidden field bound to the session id, so any process of a deployment can continue it.
The field also carries the request's id and its deadline (``REQUEST_LIFETIME`` after it entered
``/authorize``), both kept when it is sealed again: approving or denying claims the id once
(:mod:`trustplane.authorize.answers`), so a consent form posted twice, double-submitted or
replayed, is an error page the second time and writes nothing.

Login takes one or two pages: the password, then, only for users who enrolled an authenticator and
only after the password was right, the one-time code (kept in the session cookie for
``LOGIN_STEP_LIFETIME`` seconds). A wrong password answers alike for every user, and the username
typed is kept in the cookie (not the URL) so the form shows it again.

What a person sees: the operator's name (``operator_name``) on every page, legal names beside LEIs
(the entity directory), labels before identifiers, errors in ``role="alert"`` boxes.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlsplit

import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from trustplane import metrics
from trustplane.authorize.answers import Answer
from trustplane.authorize.login import Identity, LoginFailedError, LoginStep, NextStep
from trustplane.authorize.request import AuthorizationRequest, ErrorPage, RedirectError
from trustplane.authorize.sealing import Sealer
from trustplane.authorize.service import AuthorizationService
from trustplane.clients.authentication import ClientAuthenticator
from trustplane.clients.model import Client
from trustplane.dependencies import unavailable
from trustplane.errors import (
    InvalidRequestError,
    OAuth2Error,
    TemporarilyUnavailableError,
    wire_description,
)
from trustplane.mandates.errors import MandateError
from trustplane.protocol.form import FORM_TYPE, Form, read_form
from trustplane.protocol.responses import NO_STORE, dependency_of, json_response, protocol_endpoint
from trustplane.settings import Settings

log = structlog.get_logger("trustplane.authorize")
#: How long a user has to log in and decide, from the request's arrival at ``/authorize`` (not
#: renewed by the pages that follow: the one-shot answer of a request is remembered this long).
REQUEST_LIFETIME = 600
#: How long the one-time-code page stays usable after a right password.
LOGIN_STEP_LIFETIME = 300
#: ``failed=`` values of ``/authorize/continue``: a refused login, or an expired code page.
FAILURES = ("1", "expired")
#: Longest username kept for the form after a failed login (longer ones are not valid anyway).
MAX_USERNAME = 128


#: What a :data:`ParCheck` may return: applied to the parameters of the request that is stored
#: (the form's, or the request object's when ``request`` is sent: RFC 9126 §3, RFC 9101 §5) before
#: they are validated; it may supply what the request proved and raises an :class:`OAuth2Error` to
#: refuse. The DPoP check's records the proof's key as ``dpop_jkt`` (RFC 9449 §10.1).
ParBinding = Callable[[Form], None]

#: A check of a pushed authorization request before it is validated and stored (``POST /par``):
#: called with the HTTP request, the authenticated client and the parsed form; it raises an
#: :class:`OAuth2Error` to refuse (answered as RFC 6749 §5.2 JSON and audited like every PAR
#: refusal), and returns a :data:`ParBinding` or None. The place for the RFC 9449 §10 DPoP proof
#: check at PAR (``DPoP`` header, ``dpop_jkt``).
ParCheck = Callable[[Request, Client, Form], Awaitable[ParBinding | None]]


class AuthorizeHttp:
    def __init__(
        self,
        settings: Settings,
        service: AuthorizationService,
        login: LoginStep,
        sealer: Sealer,
        authenticator: ClientAuthenticator | None = None,
    ) -> None:
        self._settings, self._service, self._login, self._sealer = (
            settings,
            service,
            login,
            sealer,
        )
        #: client authentication at ``/par`` (the token endpoint's); None: no ``/par`` route
        self._authenticator = authenticator
        #: checks run at ``/par`` after client authentication, in order (see :data:`ParCheck`)
        self.par_checks: list[ParCheck] = []
        https = urlsplit(settings.issuer).scheme == "https"
        self._operator = settings.operator_name or urlsplit(settings.issuer).hostname or ""
        self._secure = https
        self._cookie = "__Host-trustplane_session" if https else "trustplane_session"
        self._templates = Environment(
            loader=PackageLoader("trustplane.authorize", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )

    def routes(self) -> list[Route]:
        routes = [
            Route("/authorize", self.authorize, methods=["GET", "POST"]),
            Route("/authorize/continue", self.resume, methods=["GET"]),
            Route("/authorize/login", self.login, methods=["POST"]),
            Route("/authorize/consent", self.consent, methods=["POST"]),
        ]
        if self._authenticator is not None:
            routes.append(Route("/par", protocol_endpoint("par", self.par), methods=["POST"]))
        return routes

    # ------------------------------------------------------------------ endpoints

    async def authorize(self, request: Request) -> Response:
        """RFC 6749 §3.1: GET, and POST with a form body."""
        try:
            if request.method == "POST":
                form = Form.parse(await request.body(), request.headers.get("content-type"))
            else:
                form = Form.parse(request.url.query.encode(), FORM_TYPE)
        except OAuth2Error as exc:
            return await self._error_page(ErrorPage(f"The request is malformed: {exc.description}"))
        try:
            parsed = await self._service.resolve(form)
        except ErrorPage as exc:
            return await self._error_page(exc)
        except TemporarilyUnavailableError as exc:  # the replay cache failed closed (Redis)
            return self._unavailable_page(exc)
        except RedirectError as exc:
            await self._service.refused(exc.target, exc.error)
            status = 303 if request.method == "POST" else 302
            return _redirect(self._service.error_redirect(exc.target, exc.error), status)
        except Exception as exc:  # the pushed-request table or a client's jwks_uri out of reach
            dependency = dependency_of(exc)
            if dependency is None:
                raise
            return self._unavailable_page(unavailable(dependency, exc, endpoint="authorization"))
        session, fresh = self._session(request)
        answer = Answer(secrets.token_urlsafe(16), int(time.time()) + REQUEST_LIFETIME)
        return await self._page(parsed, answer, session, fresh, failed="")

    async def par(self, request: Request) -> Response:
        """RFC 9126 §2: authenticate the client (as at ``/token``; an assertion's ``jti`` is
        consumed), run :attr:`par_checks`, validate and store the request; 201 with the
        ``request_uri``. Every refusal is audited."""
        client_id: str | None = None
        try:
            form = await read_form(request)
            client_id = form.get("client_id")
            assert self._authenticator is not None
            auth = await self._authenticator.authenticate(
                form, request.headers.get("authorization")
            )
            client_id = auth.client.client_id
            bindings = []
            for check in self.par_checks:
                binding = await check(request, auth.client, form)
                if binding is not None:
                    bindings.append(binding)
            request_uri, expires_in = await self._service.push(form, auth.client, bindings)
        except OAuth2Error as exc:
            await self._service.refused(None, exc, client_id=client_id and client_id[:128])
            # RFC 6749 §5.2 (RFC 9126 §2.3): a description may quote what the client sent
            exc.description = wire_description(exc.description)
            raise
        metrics.AUTHORIZATIONS.labels(outcome="pushed").inc()
        return json_response(
            {"request_uri": request_uri, "expires_in": expires_in}, 201, dict(NO_STORE)
        )

    async def resume(self, request: Request) -> Response:
        session, fresh = self._session(request)
        pending = self._pending(request.query_params.get("request"), session)
        if pending is None:
            return await self._error_page(_expired())
        failed = request.query_params.get("failed")
        return await self._page(
            *pending, session, fresh, failed=failed if failed in FAILURES else ""
        )

    async def login(self, request: Request) -> Response:
        checked = await self._checked_post(request)
        if isinstance(checked, Response):
            return checked
        form, session, (pending, answer), blob = checked
        stage = form.get("stage")
        step = _login_step(session) if stage == "otp" else None
        if stage == "restart":  # "use another account"
            return self._back(blob, _anonymous(session))
        if stage == "otp" and step is None:  # the code page expired: the password again
            return self._back(blob, _anonymous(session), failed="expired")
        try:
            result = await self._login.authenticate(_fields(form), step and step["state"])
        except LoginFailedError as exc:
            log.info(
                "login_failed", step=self._login.name, stage=stage or "password", reason=str(exc)
            )
            metrics.LOGINS.labels(outcome="failed").inc()
            if step is None:  # keep what was typed, for the form
                session = {**_anonymous(session), "username": _typed_username(form)}
            return self._back(blob, session, failed="1")
        if isinstance(result, NextStep):
            metrics.LOGINS.labels(outcome="code_requested").inc()
            expires = int(time.time()) + LOGIN_STEP_LIFETIME
            kept = {"template": result.template, "state": result.state, "exp": expires}
            return self._back(blob, {**_anonymous(session), "step": kept})
        metrics.LOGINS.labels(outcome="succeeded").inc()
        # a new session id at login (no session fixation); the pending request moves with it
        session = {"sid": secrets.token_urlsafe(32), "who": _identity_dict(result)}
        moved = self._seal_request(replace(pending, force_login=False), answer, session["sid"])
        response = _redirect(f"/authorize/continue?request={quote(moved)}")
        self._set_cookie(response, session)
        return response

    def _back(self, blob: str, session: dict[str, Any], *, failed: str = "") -> Response:
        """303 to the login page of this pending request, with the session's new state."""
        response = _redirect(
            f"/authorize/continue?request={quote(blob)}" + (f"&failed={failed}" if failed else "")
        )
        self._set_cookie(response, session)
        return response

    async def consent(self, request: Request) -> Response:
        checked = await self._checked_post(request)
        if isinstance(checked, Response):
            return checked
        form, session, (pending, answer), blob = checked
        who = await self._identity(session)
        if who is None:  # logged out, expired, or disabled meanwhile: log in again
            return _redirect(f"/authorize/continue?request={quote(blob)}")
        try:
            decision = form.get("decision")
            if decision == "approve":
                target = await self._service.approve(pending, who, answer)
            elif decision == "deny":
                target = await self._service.deny(pending, who, answer)
            else:
                return await self._error_page(ErrorPage("Choose approve or deny."))
        except ErrorPage as exc:
            return await self._error_page(exc)
        except RedirectError as exc:  # the registration no longer allows what was asked
            await self._service.refused(exc.target, exc.error)
            return _redirect(self._service.error_redirect(exc.target, exc.error))
        except MandateError as exc:  # the terms cannot become a mandate (e.g. scopes changed)
            refused = InvalidRequestError("the mandate could not be recorded", debug=str(exc))
            await self._service.refused(pending.target, refused)
            return _redirect(self._service.error_redirect(pending.target, refused))
        return _redirect(target)

    # ------------------------------------------------------------------ pieces

    async def _checked_post(
        self, request: Request
    ) -> Response | tuple[Form, dict[str, Any], tuple[AuthorizationRequest, Answer], str]:
        """A form POST with a valid CSRF token and a pending request of this session."""
        try:
            form = Form.parse(await request.body(), request.headers.get("content-type"))
        except OAuth2Error as exc:
            return await self._error_page(ErrorPage(f"The form is malformed: {exc.description}"))
        session = self._sealer.open("session", request.cookies.get(self._cookie))
        if session is None or not self._sealer.csrf_ok(session["sid"], form.get("csrf")):
            return await self._error_page(
                ErrorPage(
                    "This form has expired or was not sent from this site. Start again from the "
                    "application.",
                    debug="csrf token missing or wrong",
                    status=403,
                )
            )
        blob = form.get("request") or ""
        pending = self._pending(blob, session)
        if pending is None:
            return await self._error_page(_expired())
        return form, session, pending, blob

    async def _page(
        self,
        pending: AuthorizationRequest,
        answer: Answer,
        session: dict[str, Any],
        fresh: bool,
        *,
        failed: str,
    ) -> Response:
        try:
            html = await self._page_html(pending, answer, session, failed=failed)
        except ErrorPage as exc:  # e.g. the client was disabled while the person was on the page
            return await self._error_page(exc)
        response = _html(html)
        if fresh:
            self._set_cookie(response, session)
        return response

    async def _page_html(
        self, pending: AuthorizationRequest, answer: Answer, session: dict[str, Any], *, failed: str
    ) -> str:
        who = None if pending.force_login else await self._identity(session)
        common = {
            "csrf": self._sealer.csrf_token(session["sid"]),
            "request": self._seal_request(pending, answer, session["sid"]),
            "failed": failed,
        }
        if who is not None:
            view = await self._service.consent_view(pending, who)
            return self._render("consent.html", view=view, **common)
        client_name, client_entity = await self._service.requester(pending)
        step = _login_step(session)
        return self._render(
            step["template"] if step else self._login.template,
            client_name=client_name,
            client_entity=client_entity,
            username=step["state"].get("username") if step else session.get("username", ""),
            **common,
        )

    def _session(self, request: Request) -> tuple[dict[str, Any], bool]:
        """The current session, or a new anonymous one (True: the cookie must be set)."""
        session = self._sealer.open("session", request.cookies.get(self._cookie))
        if session is not None:
            return session, False
        return {"sid": secrets.token_urlsafe(32)}, True

    async def _identity(self, session: dict[str, Any]) -> Identity | None:
        raw = session.get("who")
        if not isinstance(raw, dict):
            return None
        return await self._login.still_valid(Identity(**raw))

    def _pending(
        self, blob: str | None, session: dict[str, Any]
    ) -> tuple[AuthorizationRequest, Answer] | None:
        """The pending request of this session and what answering it claims; None if expired,
        of another session, or sealed before requests had ids."""
        data = self._sealer.open("request", blob)
        if (
            data is None
            or data.get("sid") != session["sid"]
            or not isinstance(data.get("rid"), str)
        ):
            return None
        return AuthorizationRequest.from_dict(data["req"]), Answer(data["rid"], data["_exp"])

    def _seal_request(self, pending: AuthorizationRequest, answer: Answer, sid: str) -> str:
        """The hidden field: bound to the session, with the request's id and its deadline."""
        body = {"sid": sid, "req": pending.to_dict(), "rid": answer.request_id}
        return self._sealer.seal_until("request", body, answer.expires_at)

    def _set_cookie(self, response: Response, session: dict[str, Any]) -> None:
        lifetime = self._settings.session_lifetime
        response.set_cookie(
            self._cookie,
            self._sealer.seal("session", session, lifetime),
            max_age=lifetime,
            path="/",
            secure=self._secure,
            httponly=True,
            samesite="lax",
        )

    def _render(self, template: str, **context: Any) -> str:
        return self._templates.get_template(template).render(
            issuer=self._settings.issuer, operator=self._operator, **context
        )

    def _unavailable_page(self, exc: OAuth2Error) -> Response:
        """503 with ``Retry-After``, not audited (the audit trail may be what is down)."""
        metrics.AUTHORIZATIONS.labels(outcome="unavailable").inc()
        message = "This service is temporarily unavailable. Try again in a moment."
        page = self._render("error.html", message=message, error=exc.error)
        return HTMLResponse(page, 503, headers={**SECURITY_HEADERS, **exc.headers})

    async def _error_page(self, exc: ErrorPage) -> Response:
        await self._service.refused(None, exc)
        log.info("authorization_error_page", reason=exc.debug, status=exc.status)
        metrics.AUTHORIZATIONS.labels(outcome="error_page").inc()
        return _html(self._render("error.html", message=exc.message, error=exc.error), exc.status)


SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _html(body: str, status: int = 200) -> Response:
    return HTMLResponse(body, status, headers=SECURITY_HEADERS)


def _redirect(location: str, status: int = 303) -> Response:
    return RedirectResponse(location, status, headers=SECURITY_HEADERS)


def _expired() -> ErrorPage:
    return ErrorPage(
        "This sign-in has expired or belongs to another browser session. Start again from the "
        "application.",
        debug="pending request missing, expired or bound to another session",
    )


def _login_step(session: dict[str, Any]) -> dict[str, Any] | None:
    """The second login page's kept state, if a right password asked for it and it is fresh."""
    step = session.get("step")
    if not isinstance(step, dict) or not isinstance(step.get("state"), dict):
        return None
    expires = step.get("exp")
    if not isinstance(expires, int) or expires <= time.time():
        return None
    return step


def _anonymous(session: dict[str, Any]) -> dict[str, Any]:
    """The session without a pending second step or a kept username (same id: the pending
    request stays bound to it)."""
    return {key: value for key, value in session.items() if key not in ("step", "username")}


def _typed_username(form: Form) -> str:
    return (form.get("username") or "")[:MAX_USERNAME]


def _fields(form: Form) -> dict[str, str]:
    names = ("username", "password", "otp")
    return {name: value for name in names if (value := form.get(name)) is not None}


def _identity_dict(who: Identity) -> dict[str, Any]:
    return {
        "user_id": who.user_id,
        "lei": who.lei,
        "display_name": who.display_name,
        "auth_time": who.auth_time,
        "acr": who.acr,
    }
