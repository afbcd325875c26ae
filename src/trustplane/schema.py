"""Imports every component's tables so that ``metadata`` is complete (for Alembic and tests).

A top-level module that nothing in a component imports: ``storage`` stays below the components whose
tables it would otherwise have to know (docs/architecture.md, "Layers")."""

from trustplane.audit import tables as _audit_tables  # noqa: F401
from trustplane.authorize import answers as _authorize_answers  # noqa: F401
from trustplane.authorize import par as _authorize_par  # noqa: F401
from trustplane.authorize import store as _authorize_store  # noqa: F401
from trustplane.clients import tables as _client_tables  # noqa: F401
from trustplane.entities import store as _entity_store  # noqa: F401
from trustplane.federation import tables as _federation_tables  # noqa: F401
from trustplane.keys import tables as _key_tables  # noqa: F401
from trustplane.mandates import tables as _mandate_tables  # noqa: F401
from trustplane.policy import tables as _policy_tables  # noqa: F401
from trustplane.protocol import replay as _replay  # noqa: F401
from trustplane.protocol import revocations as _revocations  # noqa: F401
from trustplane.security_events import tables as _security_event_tables  # noqa: F401
from trustplane.ssf import tables as _ssf_tables  # noqa: F401
from trustplane.storage import generations as _generations  # noqa: F401
from trustplane.storage.metadata import metadata
from trustplane.surveillance import tables as _surveillance_tables  # noqa: F401
from trustplane.users import store as _user_store  # noqa: F401

__all__ = ["metadata"]
