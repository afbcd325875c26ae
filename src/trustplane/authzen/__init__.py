"""The decision model (OpenID AuthZEN): entities, requests, decisions, the ``DecisionPoint`` protocol,
and their JSON form. Shared by the policy decision point (``trustplane.policy``) and the PEP SDK
(``trustplane.pep``), which import it and not each other."""
