"""The console's routes (``/console/...``): thin handlers over the page services, rendered with
Jinja2 (autoescape) and one static stylesheet and script; no inline script or style, so the CSP is
``script-src 'self'; style-src 'self'`` with ``frame-ancestors 'none'``.

Every request: a valid session (else 303 to ``/console/login``), the person's account still active
and the roles still configured for them (else 403). Every POST: the CSRF token of the session (else
403, nothing changed), then the role the action needs (else 403, recorded as refused), then, for
destructive actions, the confirmation step (a page with the reason; nothing changes before it is
confirmed). Every POST answers 303 or a page.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from trustplane.audit_events import AuditEventType
from trustplane.console.actions import NEEDS_REASON, REQUIRED, ActionRefused, Actions, Person
from trustplane.console.audit_view import FILTERS, AuditView
from trustplane.console.overview import OverviewService
from trustplane.console.pages import Pages
from trustplane.console.roles import Role, held_roles, roles_from_scopes
from trustplane.console.session import Session, Sessions
from trustplane.console.signin import ConsoleClient, SignInError, pkce_pair
from trustplane.errors import OAuth2Error
from trustplane.keys.service import KeyService
from trustplane.limits import read_body
from trustplane.protocol.form import Form
from trustplane.settings import Settings
from trustplane.users.service import UserService

log = structlog.get_logger("trustplane.console")
MAX_FORM = 16 * 1024
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
#: path verbs -> actions, per kind of target
VERBS = {
    "mandates": {
        "suspend": "mandate:suspend",
        "resume": "mandate:resume",
        "revoke": "mandate:revoke",
    },
    "clients": {"disable": "client:disable", "enable": "client:enable"},
    "partners": {"disable": "partner:disable"},
}
CONFIRMED_ACTIONS = frozenset(
    {
        *(a for verbs in VERBS.values() for a in verbs.values()),
        "keys:rotate",
        "policy:activate",
        "policy:rollback",
    }
)
DONE = {
    "mandate:suspend": "The mandate is suspended.",
    "mandate:resume": "The mandate is active again.",
    "mandate:revoke": "The mandate is revoked.",
    "client:disable": "The client is disabled.",
    "client:enable": "The client is enabled.",
    "partner:disable": "The partner is disabled.",
    "partner:conformance": "The conformance run is recorded below.",
    "keys:rotate": "The signing key was rotated.",
    "policy:activate": "The bundle is active.",
    "policy:rollback": "The previous bundle is active again.",
}

#: what the confirmation page calls each action
LABELS = {
    "mandate:suspend": "Suspend mandate",
    "mandate:resume": "Resume mandate",
    "mandate:revoke": "Revoke mandate",
    "client:disable": "Disable client",
    "client:enable": "Enable client",
    "partner:disable": "Disable partner",
    "keys:rotate": "Rotate the signing key",
    "policy:activate": "Activate policy bundle",
    "policy:rollback": "Roll back from policy bundle",
}

Handler = Callable[[Request, Person, Session], Awaitable[Response]]


def _when(value: int | None, ms: bool = False) -> str:
    if value is None:
        return "—"
    seconds = value / 1000 if ms else value
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


class ConsoleHttp:
    def __init__(
        self,
        settings: Settings,
        client: ConsoleClient,
        sessions: Sessions,
        users: UserService,
        overview: OverviewService,
        pages: Pages,
        audit: AuditView,
        actions: Actions,
        keys: KeyService,
    ) -> None:
        self._settings, self._client, self._sessions, self._users = (
            settings,
            client,
            sessions,
            users,
        )
        self._overview, self._pages, self._audit, self._actions = overview, pages, audit, actions
        self._keys = keys
        self._templates = Environment(
            loader=PackageLoader("trustplane.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self._templates.filters["when"] = _when
        self._templates.filters["when_ms"] = lambda v: _when(v, ms=True)
        self._static = {
            name: (resources.files("trustplane.console") / "static" / name).read_bytes()
            for name in STATIC
        }

    async def ensure_client(self) -> None:
        """At start: find or register the console's client (docs/console.md, "Sign-in")."""
        await self._client.ensure()

    def routes(self) -> list[Route]:
        page = self._page
        return [
            Route("/console", page(self.overview), methods=["GET"]),
            Route("/console/login", self.login, methods=["GET"]),
            Route("/console/callback", self.callback, methods=["GET"]),
            Route("/console/logout", self._post(self.logout), methods=["POST"]),
            Route("/console/static/{name}", self.static, methods=["GET"]),
            Route("/console/mandates", page(self.mandates), methods=["GET"]),
            Route("/console/mandates/{target}", page(self.mandate), methods=["GET"]),
            Route("/console/clients", page(self.clients), methods=["GET"]),
            Route("/console/clients/{target}", page(self.client), methods=["GET"]),
            Route("/console/partners", page(self.partners), methods=["GET"]),
            Route("/console/partners/{target}", page(self.partner), methods=["GET"]),
            Route("/console/keys", page(self.keys), methods=["GET"]),
            Route("/console/policy", page(self.policy), methods=["GET"]),
            Route("/console/audit", page(self.audit), methods=["GET"]),
            Route("/console/audit/export", page(self.export), methods=["GET"]),
            Route("/console/audit/checkpoint", page(self.checkpoint), methods=["GET"]),
            Route("/console/transactions/{txn}", page(self.transaction), methods=["GET"]),
            Route("/console/alerts", page(self.alerts), methods=["GET"]),
            Route("/console/exceptions", page(self.exceptions), methods=["GET"]),
            Route("/console/confirm", page(self.confirm), methods=["GET"]),
            Route(
                "/console/{kind}/{target}/{verb}", self._post(self.target_action), methods=["POST"]
            ),
            Route("/console/keys/rotate", self._post(self.rotate), methods=["POST"]),
            Route("/console/policy/{verb}", self._post(self.policy_action), methods=["POST"]),
        ]

    # ------------------------------------------------------------------ plumbing

    async def _person(self, request: Request) -> tuple[Person, Session] | Response:
        session = self._sessions.read(request)
        if session is None:
            return _redirect("/console/login")
        user = await self._users.by_id(session.user_id)
        if user is None or not user.active:
            response = self._html("error.html", 403, message="Your account is disabled.", who=None)
            self._sessions.end(response)
            return response
        configured = self._settings.console_roles.get(user.username, ())
        roles = held_roles(session.granted, configured)
        if not roles:
            return self._html("error.html", 403, who=None, message=(
                "Your account holds no console role. An operator grants roles in "
                "TRUSTPLANE_CONSOLE_ROLES (docs/console.md)."
            ))  # fmt: skip
        return Person(user.user_id, user.display_name, roles), session

    def _page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            found = await self._person(request)
            if isinstance(found, Response):
                return found
            return await handler(request, *found)

        return endpoint

    def _post(
        self, handler: Callable[[Request, Person, Session, Form], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            found = await self._person(request)
            if isinstance(found, Response):
                return found
            who, session = found
            try:
                body = await read_body(request, MAX_FORM)
                form = Form.parse(body, request.headers.get("content-type"))
            except OAuth2Error:
                return self._html(
                    "error.html", 400, who=who, session=session, message="The form is malformed."
                )
            if not self._sessions.csrf_ok(session, form.get("csrf")):
                log.info("console_csrf_refused", path=request.url.path)
                return self._html("error.html", 403, who=who, session=session, message=(
                    "This form has expired or was not sent from this console. Reload the page "
                    "and try again."
                ))  # fmt: skip
            return await handler(request, who, session, form)

        return endpoint

    def _html(self, template: str, status: int = 200, /, **context: Any) -> Response:
        session: Session | None = context.pop("session", None)
        body = self._templates.get_template(template).render(
            operator=self._settings.operator_name or "trustplane",
            issuer=self._settings.issuer,
            csrf=self._sessions.csrf(session) if session else "",
            path=context.pop("path", ""),
            **context,
        )
        return HTMLResponse(body, status, headers=HEADERS)

    def _view(
        self, request: Request, who: Person, session: Session, template: str, **context: Any
    ) -> Response:
        done = request.query_params.get("done", "")
        return self._html(
            template, who=who, session=session, path=request.url.path,
            done=DONE.get(done, ""), can=_can(who), **context,
        )  # fmt: skip

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found", 404, media_type="text/plain")
        headers = {"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"}
        return Response(self._static[name], media_type=STATIC[name], headers=headers)

    # ------------------------------------------------------------------ sign-in, sign-out

    async def login(self, request: Request) -> Response:
        state, (verifier, challenge) = secrets.token_urlsafe(24), pkce_pair()
        response = _redirect(await self._client.authorize_url(state, challenge))
        self._sessions.begin_login(response, state, verifier)
        return response

    async def callback(self, request: Request) -> Response:
        pending = self._sessions.pending_login(request)
        params = request.query_params
        if pending is None or not secrets.compare_digest(
            str(pending["state"]), params.get("state", "")
        ):
            return self._html("error.html", 400, who=None, login=True, message=(
                "This sign-in has expired or was started in another browser. Sign in again."
            ))  # fmt: skip
        if params.get("iss") != self._settings.issuer or "code" not in params:
            reason = params.get("error", "no code")[:64]
            return self._html("error.html", 403, who=None, login=True, message=(
                f"The sign-in was not completed ({reason})."
            ))  # fmt: skip
        try:
            signed = await self._client.redeem(params["code"], str(pending["verifier"]))
        except (OAuth2Error, SignInError) as exc:
            log.info("console_sign_in_failed", error=str(exc))
            return self._html(
                "error.html",
                403,
                who=None,
                login=True,
                message="The sign-in failed. Sign in again.",
            )
        granted = roles_from_scopes(signed.scope)
        user = await self._users.by_id(signed.user_id)
        configured = self._settings.console_roles.get(user.username, ()) if user else ()
        roles = held_roles(granted, configured)
        who = Person(signed.user_id, user.display_name if user else "", roles)
        if not roles:
            await self._actions.record(
                who, AuditEventType.CONSOLE_ACTION_REFUSED, "session:start", None, refused="no_role"
            )
            response = self._html("error.html", 403, who=None, login=True, message=(
                "Your account holds no console role. An operator grants roles in "
                "TRUSTPLANE_CONSOLE_ROLES (docs/console.md)."
            ))  # fmt: skip
        else:
            await self._actions.record(who, AuditEventType.CONSOLE_SIGNED_IN, "session:start", None)
            response = _redirect("/console")
            self._sessions.start(response, signed.user_id, granted, int(time.time()))
        self._sessions.end_login(response)
        return response

    async def logout(self, request: Request, who: Person, session: Session, form: Form) -> Response:
        await self._actions.record(who, AuditEventType.CONSOLE_SIGNED_OUT, "session:end", None)
        response = self._html("signed_out.html", who=None)
        self._sessions.end(response)
        return response

    # ------------------------------------------------------------------ pages

    async def overview(self, request: Request, who: Person, session: Session) -> Response:
        data = await self._overview.overview()
        return self._view(request, who, session, "overview.html", data=data)

    async def alerts(self, request: Request, who: Person, session: Session) -> Response:
        return self._view(
            request, who, session, "alerts.html", alerts=await self._overview.alerts()
        )

    async def exceptions(self, request: Request, who: Person, session: Session) -> Response:
        """Settlement exceptions from the ledger; every console role reads them, none resolves
        them here (the service's API or CLI does, and its event closes them)."""
        found = await self._overview.exceptions.exceptions()
        return self._view(
            request, who, session, "exceptions.html", found=found, now=int(time.time())
        )

    async def mandates(self, request: Request, who: Person, session: Session) -> Response:
        q = request.query_params.get("q", "")[:128]
        status = request.query_params.get("status", "")[:16]
        found = await self._pages.search_mandates(q, status)
        return self._view(request, who, session, "mandates.html", q=q, status=status, found=found)

    async def mandate(self, request: Request, who: Person, session: Session) -> Response:
        from trustplane.mandates.errors import MandateError

        try:
            view = await self._pages.mandate(request.path_params["target"])
        except MandateError:
            return self._not_found(who, session, "No such mandate.")
        return self._view(request, who, session, "mandate.html", view=view)

    async def clients(self, request: Request, who: Person, session: Session) -> Response:
        return self._view(
            request, who, session, "clients.html", clients=await self._pages.clients()
        )

    async def client(self, request: Request, who: Person, session: Session) -> Response:
        try:
            client, events = await self._pages.client(request.path_params["target"])
        except LookupError:
            return self._not_found(who, session, "No such client.")
        return self._view(request, who, session, "client.html", client=client, events=events)

    async def partners(self, request: Request, who: Person, session: Session) -> Response:
        return self._view(
            request, who, session, "partners.html", partners=await self._pages.partners()
        )

    async def partner(self, request: Request, who: Person, session: Session) -> Response:
        try:
            current, versions, last = await self._pages.partner(request.path_params["target"])
        except LookupError:
            return self._not_found(who, session, "No such partner.")
        return self._view(
            request, who, session, "partner.html", current=current, versions=versions, last=last
        )

    async def keys(self, request: Request, who: Person, session: Session) -> Response:
        keys = await self._keys.list_all()
        return self._view(
            request,
            who,
            session,
            "keys.html",
            keys=keys,
            soon=await self._overview.expiring(int(time.time())),
        )

    async def policy(
        self, request: Request, who: Person, session: Session, report: Any = None
    ) -> Response:
        bundles, activations, active = await self._pages.policy()
        old, new = (
            request.query_params.get("old", "")[:64],
            request.query_params.get("new", "")[:64],
        )
        diff: list[tuple[str, list[str]]] | None = None
        problem = ""
        if old and new:
            try:
                diff = await self._pages.bundle_diff(old, new)
            except LookupError as exc:
                problem = str(exc)
        return self._view(
            request, who, session, "policy.html", bundles=bundles, activations=activations,
            active=active, old=old, new=new, diff=diff, problem=problem, report=report,
        )  # fmt: skip

    def _filters(self, request: Request) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in FILTERS:
            value = request.query_params.get(name, "").strip()[:256]
            if value:
                out[name] = value
        for bound in ("since", "until"):
            raw = request.query_params.get(bound, "")
            if raw.isdigit() and len(raw) <= 12:
                out[bound] = int(raw) * 1000
        return out

    async def audit(self, request: Request, who: Person, session: Session) -> Response:
        filters = self._filters(request)
        raw_after = request.query_params.get("after", "0")
        after = int(raw_after) if raw_after.isdigit() and len(raw_after) <= 18 else 0
        found = await self._audit.search(filters, after)
        shown = {k: (v // 1000 if k in ("since", "until") else v) for k, v in filters.items()}
        query = urlencode(shown)
        return self._view(
            request, who, session, "audit.html", found=found, filters=shown, query=query,
            names=FILTERS,
        )  # fmt: skip

    async def export(self, request: Request, who: Person, session: Session) -> Response:
        from trustplane.audit.ledger import LedgerError

        filters = self._filters(request)
        try:
            _note, lines = await self._audit.export(filters, _size(request))
        except LedgerError:
            return self._not_found(who, session, "The log has no signed checkpoint yet.")
        await self._actions.record(
            who, AuditEventType.CONSOLE_ACTION, "audit:export", None, filters=filters
        )
        body = b"".join(lines)
        headers = {**HEADERS, "Content-Disposition": 'attachment; filename="audit-export.jsonl"'}
        return Response(body, media_type="application/jsonl", headers=headers)

    async def checkpoint(self, request: Request, who: Person, session: Session) -> Response:
        note = await self._audit.checkpoint_note(_size(request))
        if note is None:
            return self._not_found(who, session, "The log has no signed checkpoint yet.")
        headers = {**HEADERS, "Content-Disposition": 'attachment; filename="checkpoint.txt"'}
        return Response(note, media_type="text/plain; charset=utf-8", headers=headers)

    async def transaction(self, request: Request, who: Person, session: Session) -> Response:
        txn = request.path_params["txn"][:128]
        chain = await self._audit.chain(txn)
        return self._view(request, who, session, "transaction.html", chain=chain)

    async def confirm(self, request: Request, who: Person, session: Session) -> Response:
        action = request.query_params.get("action", "")
        target = request.query_params.get("target", "")[:128]
        if action not in CONFIRMED_ACTIONS:
            return self._not_found(who, session, "Unknown action.")
        return self._confirm_page(request, who, session, action, target, "")

    def _confirm_page(
        self,
        request: Request,
        who: Person,
        session: Session,
        action: str,
        target: str,
        problem: str,
    ) -> Response:
        return self._view(
            request, who, session, "confirm.html", action=action, target=target,
            label=LABELS[action],
            post=_post_path(action, target), needs_reason=action in NEEDS_REASON,
            allowed=REQUIRED[action] in who.roles, problem=problem,
            back=_back_path(action, target),
        )  # fmt: skip

    def _not_found(self, who: Person, session: Session, message: str) -> Response:
        return self._html("error.html", 404, who=who, session=session, message=message)

    # ------------------------------------------------------------------ actions

    async def _act(
        self,
        request: Request,
        who: Person,
        session: Session,
        form: Form,
        action: str,
        target: str,
        back: str,
    ) -> Response:
        if REQUIRED[action] not in who.roles:
            await self._actions.record(
                who, AuditEventType.CONSOLE_ACTION_REFUSED, action, target, refused="forbidden"
            )
            return self._html("error.html", 403, who=who, session=session, message=(
                f"Your role does not allow this ({action} needs the {REQUIRED[action].value} role)."
            ))  # fmt: skip
        if action in CONFIRMED_ACTIONS and form.get("confirmed") != "yes":
            return self._confirm_page(request, who, session, action, target, "")
        try:
            await self._actions.perform(who, action, target, form.get("reason") or "")
        except ActionRefused as exc:
            return self._confirm_page(request, who, session, action, target, str(exc))
        return _redirect(f"{back}?done={quote(action)}")

    async def target_action(
        self, request: Request, who: Person, session: Session, form: Form
    ) -> Response:
        kind, target, verb = (request.path_params[n] for n in ("kind", "target", "verb"))
        if kind == "partners" and verb == "conformance":
            return await self._conformance(request, who, session, form, target)
        action = VERBS.get(kind, {}).get(verb)
        if action is None:
            return self._not_found(who, session, "Unknown action.")
        return await self._act(
            request, who, session, form, action, target[:128], f"/console/{kind}/{quote(target)}"
        )

    async def rotate(self, request: Request, who: Person, session: Session, form: Form) -> Response:
        return await self._act(request, who, session, form, "keys:rotate", "", "/console/keys")

    async def policy_action(
        self, request: Request, who: Person, session: Session, form: Form
    ) -> Response:
        verb = request.path_params["verb"]
        action = f"policy:{verb}"
        if action not in ("policy:activate", "policy:rollback", "policy:simulate"):
            return self._not_found(who, session, "Unknown action.")
        version = (form.get("version") or "")[:64]
        if action != "policy:simulate":
            return await self._act(request, who, session, form, action, version, "/console/policy")
        if Role.COMPLIANCE not in who.roles:
            await self._actions.record(
                who, AuditEventType.CONSOLE_ACTION_REFUSED, action, version, refused="forbidden"
            )
            return self._html(
                "error.html",
                403,
                who=who,
                session=session,
                message="Simulations need the compliance role.",
            )
        try:
            report = await self._actions.simulate(who, version)
        except ActionRefused as exc:
            return self._html("error.html", 400, who=who, session=session, message=str(exc))
        return await self.policy(request, who, session, report=report)

    async def _conformance(
        self, request: Request, who: Person, session: Session, form: Form, partner_id: str
    ) -> Response:
        if REQUIRED["partner:conformance"] not in who.roles:
            await self._actions.record(
                who,
                AuditEventType.CONSOLE_ACTION_REFUSED,
                "partner:conformance",
                partner_id,
                refused="forbidden",
            )
            return self._html(
                "error.html",
                403,
                who=who,
                session=session,
                message="Conformance runs need the operator role.",
            )
        url = (form.get("metadata_url") or "").strip()
        if not url:
            return self._html(
                "error.html",
                400,
                who=who,
                session=session,
                message="Give the partner's metadata URL.",
            )
        try:
            await self._actions.conformance(
                who, partner_id, url, loopback=self._settings.federation_allow_insecure_loopback
            )
        except ActionRefused as exc:
            return self._html("error.html", 400, who=who, session=session, message=str(exc))
        return _redirect(f"/console/partners/{quote(partner_id)}?done=partner:conformance")


def _size(request: Request) -> int | None:
    raw = request.query_params.get("size", "")
    return int(raw) if raw.isdigit() and 0 < len(raw) <= 18 else None


def _post_path(action: str, target: str) -> str:
    kind, verb = action.split(":")
    if kind == "keys":
        return "/console/keys/rotate"
    if kind == "policy":
        return f"/console/policy/{verb}"
    return f"/console/{kind}s/{quote(target)}/{verb}"


def _back_path(action: str, target: str) -> str:
    kind = action.split(":")[0]
    if kind in ("keys", "policy"):
        return f"/console/{kind}"
    return f"/console/{kind}s/{quote(target)}"


def _can(who: Person) -> dict[str, bool]:
    return {action: role in who.roles for action, role in REQUIRED.items()}


def _redirect(location: str) -> Response:
    return RedirectResponse(location, 303, headers=HEADERS)
