"""Console roles are scopes of the console's own audience (``{issuer}/console``).

A person holds a role when both are true: the console asked for its scope and the person approved it
(the authorization code flow), and the operator listed the role for the person's username in
``TRUSTPLANE_CONSOLE_ROLES``. The second is checked again on every request, so removing a role (or
disabling the user) takes effect at once, not when the session ends.
"""

from __future__ import annotations

from enum import StrEnum

from trustplane.protocol.scopes import Scope, Vocabulary, check_scope_name, internal_audience

CONSOLE_PATH = "/console"


class Role(StrEnum):
    OPERATOR = "operator"
    COMPLIANCE = "compliance"
    AUDITOR = "auditor"

    @property
    def scope(self) -> str:
        return f"console:{self.value}"


DESCRIPTIONS = {
    Role.OPERATOR: "Operate the console: manage clients, partners, keys and mandates",
    Role.COMPLIANCE: "Use the console for compliance: policy bundles, activations and simulations",
    Role.AUDITOR: "Read the console: every page, the audit trail and its proofs; change nothing",
}


def console_audience(issuer: str) -> str:
    return internal_audience(issuer, CONSOLE_PATH)


def with_console_roles(vocabulary: Vocabulary, issuer: str) -> Vocabulary:
    """The vocabulary plus the console's audience and its three role scopes (internal: only an
    operator's registration may name them, and the console's built-in client is the only one)."""
    audience = console_audience(issuer)
    scopes = dict(vocabulary.scopes)
    for role in Role:
        check_scope_name(role.scope)
        scopes[role.scope] = Scope(role.scope, DESCRIPTIONS[role], frozenset({audience}))
    resources = {**vocabulary.resources, audience: "trustplane operator and compliance console"}
    return Vocabulary(scopes, resources, vocabulary.internal | {audience})


def roles_from_scopes(scope: str) -> frozenset[Role]:
    names = set(scope.split())
    return frozenset(role for role in Role if role.scope in names)


def held_roles(granted: frozenset[Role], configured: tuple[str, ...]) -> frozenset[Role]:
    """What the person may do now: granted in the flow and still configured for them."""
    return frozenset(role for role in granted if role.value in configured)
