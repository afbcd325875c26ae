"""The operator's side of the demo, one process per deployment and batch (what ``trustplane
users add``, ``clients add``, ``partners add`` and ``audit export`` do, through the same services,
without a process per command: each command's start costs seconds on a loaded machine).

    python -m trustplane.demo.operator    (with the deployment's TRUSTPLANE_* environment)

reads a batch of actions (a JSON list) per line on stdin and answers their results, in order, on
one line of stdout; the process starts with the deployment's server, so its imports are paid once:

- ``{"op": "user", "username", "name", "lei", "password"}`` → ``{"username"}``
- ``{"op": "client", "metadata": {...}}`` (RFC 7591 metadata, operator rights included, e.g.
  ``resource_server_for``) → ``{"client_id"}``
- ``{"op": "partner", "document": {...}}`` (a trust profile) → ``{"partner_id", "version"}``
- ``{"op": "export", "out": path, "checkpoint": path}`` → ``{"entries", "tree_size", "key"}``: the
  entries up to the latest signed checkpoint (JSONL), the checkpoint, the log's verifier key.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from trustplane.app import Services
from trustplane.audit.export_format import export_line
from trustplane.settings import load_settings

CHANGED_BY = "demo operator"


async def _act(svc: Services, action: dict[str, Any]) -> dict[str, Any]:
    op = action["op"]
    if op == "user":
        await svc.authorization.users.add(
            action["username"], action["name"], action["lei"], action["password"]
        )
        return {"username": action["username"]}
    if op == "client":
        reg = await svc.clients.register(
            action["metadata"], initial_access_token=None, issue_registration_token=False
        )
        return {"client_id": reg.client.client_id}
    if op == "partner":
        stored = await svc.federation.add(action["document"], changed_by=CHANGED_BY)
        return {"partner_id": stored.partner_id, "version": stored.version}
    if op == "export":
        return await _export(svc, Path(action["out"]), Path(action["checkpoint"]))
    raise ValueError(f"unknown action {op!r}")


async def _export(svc: Services, out: Path, checkpoint: Path) -> dict[str, Any]:
    """The entries up to the latest checkpoint; :func:`main` writes them (no file I/O here)."""
    latest = await svc.ledger.checkpoint()
    if latest is None:
        raise RuntimeError("the log has no checkpoint yet")
    lines = [export_line(item, None) async for item in svc.ledger.iter_entries(0, latest.size)]
    return {
        "entries": len(lines),
        "tree_size": latest.size,
        "key": await svc.ledger.verifier_key(),
        "_files": {str(out): b"".join(lines).decode(), str(checkpoint): latest.note},
    }


def _write_files(results: list[dict[str, Any]]) -> None:
    for result in results:
        for path, text in result.pop("_files", {}).items():
            Path(path).write_text(text)


async def serve() -> None:
    """One batch per stdin line, one answer per stdout line (``{"results": [...]}`` or
    ``{"error": ...}``), until stdin closes. The services are built at the first batch, once the
    deployment's server has made its database."""
    loop = asyncio.get_running_loop()
    svc: Services | None = None
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            try:
                svc = svc or Services.build(load_settings())
                results = [await _act(svc, action) for action in json.loads(line)]
                _write_files(results)
                answer: dict[str, Any] = {"results": results}
            except Exception as exc:  # reported to the demo, which fails the step
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        if svc is not None:
            await svc.db.dispose()


if __name__ == "__main__":
    asyncio.run(serve())
