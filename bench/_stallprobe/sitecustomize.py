"""Diagnosis only (bench/hotpath_profile.py --stalls): loaded as ``sitecustomize`` by a server
started with this directory first on ``PYTHONPATH``. In every process that runs uvicorn's
``Server.serve`` it records, to ``$TP_STALL_DIR/<pid>.json`` every 2 s:

* event-loop lag: a task sleeps 5 ms and notes how much later than that it woke (a callback or
  coroutine step that held the loop, or the process waiting for a core);
* cyclic garbage collections: generation and pause;
* the group-commit writer's batches (``GroupCommitWriter._flush``: start, end, size), the
  ledger sequencer's rounds (``Ledger.integrate_all``: start, end) and the proof cache's fills of
  its lower levels (``ProofNodes.fill``: start, end, nodes read), the sequencer's writing
  statements on PostgreSQL (``store.pg_move_slice``, ``store.pg_advance``), on the same clock
  (``clock``: one monotonic / wall pair, to place PostgreSQL's logged checkpoints);
* every public HTTP request's time in the ASGI app (start, end), to ``<pid>.req`` as raw doubles
  (an array written whole: a JSON dump of tens of thousands of them would itself stall the loop).

Not part of trustplane; nothing here changes what the server does.
"""

from __future__ import annotations

import array
import asyncio
import gc
import json
import os
import time

_DIR = os.environ.get("TP_STALL_DIR", "")
_DATA: dict[str, list[list[float]]] = {
    "lag": [],
    "gc": [],
    "flush": [],
    "integrate": [],
    "fill": [],
    "move": [],
    "clock": [],
}
_REQUESTS = array.array("d")
_GC_START = [0.0]


def _gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _GC_START[0] = time.perf_counter()
    else:
        _DATA["gc"].append(
            [time.monotonic(), info["generation"], time.perf_counter() - _GC_START[0]]
        )


def _dump() -> None:
    with open(os.path.join(_DIR, f"{os.getpid()}.json"), "w") as handle:
        json.dump(_DATA, handle)
    with open(os.path.join(_DIR, f"{os.getpid()}.req"), "wb") as raw:
        _REQUESTS.tofile(raw)


async def _monitor() -> None:
    last_dump = time.monotonic()
    while True:
        start = time.monotonic()
        await asyncio.sleep(0.005)
        now = time.monotonic()
        _DATA["lag"].append([now, now - start - 0.005])
        if now - last_dump > 2.0:
            last_dump = now
            _dump()


def _timed(cls: type, name: str, key: str, size: bool) -> None:
    original = getattr(cls, name)

    async def wrapper(self: object, *args: object, **kwargs: object) -> object:
        started = time.monotonic()
        result = None
        try:
            result = await original(self, *args, **kwargs)
            return result
        finally:
            if key == "fill":
                n = float(result or 0)
            else:
                n = float(len(args[0])) if size and args else 0.0  # type: ignore[arg-type]
            _DATA[key].append([started, time.monotonic(), n])

    setattr(cls, name, wrapper)


def _statement_timed(module: object, name: str, key: str) -> None:
    original = getattr(module, name)

    async def wrapper(*args: object, **kwargs: object) -> object:
        started = time.monotonic()
        try:
            return await original(*args, **kwargs)
        finally:
            _DATA[key].append([started, time.monotonic(), 0.0])

    setattr(module, name, wrapper)


def _requests_timed() -> None:
    from trustplane.server import Listeners

    original = Listeners.__call__

    async def wrapper(self: object, scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http" or scope.get("path") != "/token":
            await original(self, scope, receive, send)  # type: ignore[arg-type]
            return
        started = time.monotonic()
        try:
            await original(self, scope, receive, send)  # type: ignore[arg-type]
        finally:
            _REQUESTS.extend((started, time.monotonic()))

    Listeners.__call__ = wrapper  # type: ignore[method-assign]


def _install() -> None:
    import uvicorn.server

    serve = uvicorn.server.Server.serve

    async def serving(self: object, *args: object, **kwargs: object) -> None:
        from trustplane.audit.ledger import Ledger
        from trustplane.audit.proof_nodes import ProofNodes
        from trustplane.storage.writer import GroupCommitWriter

        _timed(GroupCommitWriter, "_flush", "flush", True)
        _timed(Ledger, "integrate_all", "integrate", False)
        _timed(ProofNodes, "fill", "fill", False)
        _requests_timed()
        from trustplane.audit import store

        # the sequencer's statements that write (PostgreSQL): the leaves' slices and the new state
        _statement_timed(store, "pg_move_slice", "move")
        _statement_timed(store, "pg_advance", "move")
        _DATA["clock"].append([time.monotonic(), time.time(), 0.0])
        gc.callbacks.append(_gc)
        task = asyncio.get_running_loop().create_task(_monitor())
        try:
            await serve(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            task.cancel()

    uvicorn.server.Server.serve = serving  # type: ignore[method-assign]


if _DIR:
    _install()
