"""The app bench/idempotency.py drives: one trivial JSON handler behind two POST routes.

``/plain`` calls it directly; ``/settlements`` calls it through ``IdempotentOperation`` on a
``SqlIdempotencyStore`` at ``IDEM_BENCH_DATABASE_URL``, with a fixed scope: no token and no PEP, so
the difference between the two routes is the idempotency cost alone. ``/counts`` returns the
``trustplane_pep_idempotency_total`` outcomes, so the bench can check that a run executed or
replayed what it meant to.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from trustplane.pep import IdempotencyService, SqlIdempotencyStore, metrics
from trustplane.pep.idempotency_http import IdempotentOperation
from trustplane.storage.db import Database

SCOPE = "bench-client"


def create_app(database_url: str) -> FastAPI:
    database = Database(database_url)
    store = SqlIdempotencyStore(database)
    submit_once = IdempotentOperation(IdempotencyService(store), operation="settlement:submit")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await store.create_schema()
        yield
        await database.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/plain")
    async def plain(request: Request) -> Response:
        return settle(await request.body())

    @app.post("/settlements")
    async def settlements(request: Request) -> Response:
        body = await request.body()
        return await submit_once.run(request, scope=SCOPE, handler=lambda: settle(body))

    @app.get("/counts")
    async def counts() -> dict[str, float]:
        return outcome_counts()

    return app


def settle(body: bytes) -> Response:
    instruction: dict[str, Any] = orjson.loads(body)
    answer = {"instruction_id": instruction["instruction_id"], "status": "accepted"}
    return Response(orjson.dumps(answer), 201, media_type="application/json")


def outcome_counts() -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for family in metrics.PEP_IDEMPOTENCY.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def app_from_env() -> FastAPI:
    """The factory uvicorn calls (``--factory``): nothing is built at import time."""
    return create_app(os.environ["IDEM_BENCH_DATABASE_URL"])
