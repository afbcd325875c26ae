"""The remote PDP client a PEP uses: OpenID AuthZEN Authorization API 1.0 over HTTP. The wire format
(JSON <-> ``Entity``/``Decision``) is :mod:`trustplane.authzen.wire`, shared with the HTTP PDP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import structlog

from trustplane.authzen.model import Decision, DecisionRequest, Entity, FailReason
from trustplane.authzen.wire import decision_from_json, request_to_json
from trustplane.outbound import OutboundError, OutboundFetcher, OutboundPolicy
from trustplane.pep import metrics
from trustplane.pep.client_auth import ClientAuth
from trustplane.pep.keys import check_url

log = structlog.get_logger("trustplane.pep")
#: A batch answer of MAX_EVALUATIONS decisions is far below this.
MAX_ANSWER_BYTES = 256 * 1024


# --------------------------------------------------------------------------- remote client


class AuthzenClient:
    """A :class:`~trustplane.authzen.model.DecisionPoint` that asks a remote AuthZEN PDP over HTTP.

    It authenticates with an access token for the PDP's audience, obtained by client credentials at
    ``token_endpoint`` (scope ``decision:evaluate``) and reused until shortly before it expires.
    Like every decision point it never raises: a PDP that cannot be reached, or answers anything but a
    decision, gives a deny with reason ``pdp_unreachable`` (fail closed) and increments
    ``trustplane_pep_pdp_unavailable_total``. Decisions are recorded by the PDP, not here.
    """

    def __init__(
        self,
        pdp: str,
        *,
        token_endpoint: str,
        auth: ClientAuth,
        audience: str | None = None,
        scope: str = "decision:evaluate",
        fetcher: OutboundFetcher | None = None,
        timeout: float = 2.0,
    ) -> None:
        self._own_fetcher = fetcher is None
        policy = OutboundPolicy(read_timeout=timeout, total_timeout=2 * timeout)
        self._fetcher = fetcher or OutboundFetcher(policy)
        self.pdp = check_url(pdp.rstrip("/"), "PDP URL", self._fetcher)
        self._token_endpoint = check_url(token_endpoint, "token endpoint", self._fetcher)
        self._auth, self._scope = auth, scope
        self._audience = audience or f"{self.pdp}/access/v1"
        self._token: tuple[str, float] | None = None

    async def decide(
        self,
        subject: Entity,
        action: str,
        resource: Entity,
        context: Mapping[str, Any],
        *,
        correlation_id: str | None = None,
        transaction_id: str | None = None,
    ) -> Decision:
        request = DecisionRequest(
            subject, action, resource, context, correlation_id, transaction_id
        )
        body = await self._post("/access/v1/evaluation", request_to_json(request), correlation_id)
        try:
            return decision_from_json(body)
        except ValueError as exc:
            return self._unreachable(repr(exc))

    async def decide_many(self, requests: Sequence[DecisionRequest]) -> list[Decision]:
        if not requests:
            return []
        payload = {"evaluations": [request_to_json(r) for r in requests]}
        body = await self._post("/access/v1/evaluations", payload, requests[0].correlation_id)
        answers = body.get("evaluations") if isinstance(body, dict) else None
        try:
            if not isinstance(answers, list) or len(answers) != len(requests):
                raise ValueError("the PDP answered a different number of evaluations")
            return [decision_from_json(a) for a in answers]
        except ValueError as exc:
            return [self._unreachable(repr(exc)) for _ in requests]

    async def _post(self, path: str, payload: object, correlation_id: str | None) -> object:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if correlation_id:
            headers["X-Request-ID"] = correlation_id
        content = orjson.dumps(payload)
        try:
            for attempt in (1, 2):
                headers["Authorization"] = f"Bearer {await self._access_token()}"
                response = await self._fetcher.request(
                    "POST", self.pdp + path, purpose="pep_pdp", content=content,
                    headers=headers, max_bytes=MAX_ANSWER_BYTES,
                )  # fmt: skip
                if response.status != 401 or attempt == 2:
                    break
                self._token = None  # expired or revoked early: retry once with a fresh token
            if response.status != 200:
                return {"error": f"status {response.status}"}
            return response.json()
        except (OutboundError, ValueError) as exc:
            return {"error": repr(exc)}

    async def _access_token(self) -> str:
        if self._token is not None and self._token[1] > time.monotonic():
            return self._token[0]
        form = {"grant_type": "client_credentials", "scope": self._scope}
        form["resource"] = self._audience
        headers = {"Accept": "application/json"}
        self._auth.apply(form, headers)
        response = await self._fetcher.request(
            "POST", self._token_endpoint, purpose="pep_token", data=form, headers=headers
        )
        body = response.json() if response.status == 200 else {}
        body = body if isinstance(body, dict) else {}
        token, lifetime = body.get("access_token"), body.get("expires_in", 60)
        if not isinstance(token, str) or not isinstance(lifetime, int):
            raise ValueError(f"token endpoint answered {response.status}")
        # Renew a little early so a token never expires between here and the PDP.
        self._token = (token, time.monotonic() + max(lifetime - 30, lifetime / 2))
        return token

    def _unreachable(self, error: str) -> Decision:
        metrics.PEP_PDP_UNAVAILABLE.inc()
        log.error("pdp_unreachable", pdp=self.pdp, error=error)
        return Decision(False, (FailReason.PDP_UNREACHABLE.value,), "", uuid.uuid4().hex)

    async def aclose(self) -> None:
        if self._own_fetcher:
            await self._fetcher.aclose()
