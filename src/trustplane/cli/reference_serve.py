"""``trustplane reference serve``: the reference settlement services as one process (uvicorn), the
app built by :func:`trustplane.reference.serve.create_reference_app` from the
``TRUSTPLANE_REFERENCE_*`` settings (docs/settlement.md, "Running the services")."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn

from trustplane.cli.common import fail
from trustplane.logging import configure_logging
from trustplane.reference.serve import ServeSettings, create_reference_app
from trustplane.reference.settings import ReferenceSettingsError
from trustplane.server import BoundedHttpToolsProtocol, freezing_when_started


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8100,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    keep_alive: Annotated[
        int,
        typer.Option(min=1, max=3600, help="Seconds an idle keep-alive connection stays open."),
    ] = 75,
) -> None:
    """Serve the reference services (orders, execution, allocation, settlement, exceptions,
    events) behind the PEP SDK; with TRUSTPLANE_REFERENCE_NATS_URL, also publish the outbox."""
    try:
        settings = ServeSettings.from_env()
        app = create_reference_app(settings)
    except (ReferenceSettingsError, OSError, ValueError) as exc:
        fail(str(exc))
    configure_logging(log_level, "console")
    uvicorn.run(
        freezing_when_started(app), host=host, port=port, log_level=log_level, http=BoundedHttpToolsProtocol,
        access_log=log_level == "debug", timeout_keep_alive=keep_alive,
    )  # fmt: skip
