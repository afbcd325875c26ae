"""The one guard of trustplane's own bearer-protected routes, and the one error renderer behind them.

- :mod:`.guard`: :class:`BearerGuard`, framework-free: signature with our key ring, ``typ``, ``iss``,
  ``aud``, ``exp``/``nbf``, client active, revocation, the mandate's liveness, scopes.
- :mod:`.revoked`: :class:`RevokedTokens`, the revocation list in memory with explicit invalidation.
- :mod:`.http`: the Starlette/FastAPI adapter and :func:`render_error` with a per-router
  :class:`~trustplane.errors.ErrorTable`.

How to add a bearer-protected API: docs/architecture.md, "Bearer-protected routes".
"""

from trustplane.bearer_guard.guard import BearerGuard, BearerRequest, Protected
from trustplane.bearer_guard.revoked import RevokedTokens

__all__ = ["BearerGuard", "BearerRequest", "Protected", "RevokedTokens"]
