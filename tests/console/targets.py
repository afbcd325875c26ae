"""Things for console actions to act on: a mandate, a client, a partner, a second policy bundle."""

from __future__ import annotations

from typing import Any

from tests.conftest import LEI, register_kit
from tests.federation.partners import Partner
from trustplane.app import Services
from trustplane.mandates.model import MandateTerms
from trustplane.policy.bundle import BundleSource, default_bundle

GRANTOR = "529900T8BM49AURSDO55"


async def new_mandate(svc: Services, client_id: str | None = None) -> str:
    if client_id is None:
        client_id = (await register_kit(svc)).client_id
    terms = MandateTerms(grantor_lei=GRANTOR, grantee_client_id=client_id, scopes=("order:create",))
    created = await svc.mandates.create(terms, actor="test", accepted_by="test")
    return created.id


async def new_client(svc: Services) -> str:
    return (await register_kit(svc)).client_id


async def new_partner(svc: Services, name: str) -> str:
    partner = Partner(name, f"https://{name}.example", svc.settings.issuer)
    stored = await svc.federation.add(partner.profile(), changed_by="test")
    return stored.partner_id


async def new_bundle(svc: Services, note: str) -> str:
    files: dict[str, Any] = dict(default_bundle().files)
    name = next(n for n in files if n.endswith(".cedar"))
    files[name] = files[name] + f"\n// {note}\n"
    published = await svc.policy.publish(BundleSource(files), f"chg-{note}", "test")
    return published.record.version


__all__ = ["LEI", "new_bundle", "new_client", "new_mandate", "new_partner"]
