"""``trustplane events``: the authorization server's signed security events (docs/events.md)."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

import structlog
import typer

from trustplane.cli.common import _run, _settings, _with_services, fail

if TYPE_CHECKING:
    from trustplane.services import Services

log = structlog.get_logger("trustplane.events")
KEY_RELOAD = 10.0
events_app = typer.Typer(
    help="The authorization server's signed security events.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@events_app.command("publish")
def publish() -> None:
    """Publish the security events to NATS JetStream (TRUSTPLANE_EVENTS_NATS_URL) until
    interrupted: a dedicated publisher process. ``trustplane serve`` runs the same loop when the
    setting is set; any number of them may run at once on PostgreSQL (one publishes at a time)."""
    settings = _settings()
    if not settings.events_nats_url:
        fail("TRUSTPLANE_EVENTS_NATS_URL is not set")

    async def run(services: Services) -> None:
        from trustplane.security_events import wiring

        await services.keys.load()
        component = wiring.build(settings, services.db, services.keys, services.guard)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        reloading = asyncio.create_task(_reload_keys(services, stopping))
        try:
            await component.run(stopping)
        finally:
            stopping.set()
            await reloading
            await component.close()

    _run(_with_services(settings, run))


async def _reload_keys(services: Services, stopping: asyncio.Event) -> None:
    """Follow rotations made by other processes: events are signed with the active key."""
    while True:
        try:
            await asyncio.wait_for(stopping.wait(), KEY_RELOAD)
            return
        except TimeoutError:
            try:
                await services.keys.load()
            except Exception as exc:  # keep the last ring; try again next time
                log.warning("event_publisher_key_reload_failed", error=repr(exc))
