"""The writer component: the group-commit writer that batches hot-path writes (audit events,
replay rows, token outcomes, decision records) into one transaction per batch."""

from __future__ import annotations

from dataclasses import dataclass

from trustplane.component import Idle
from trustplane.storage.writer import GroupCommitWriter


@dataclass
class Writer(Idle):
    """Last in the list: it starts when every component that writes through it is ready, and it
    closes first, finishing what is queued before the others close (the ledger integrates what it
    flushed)."""

    writer: GroupCommitWriter
    name = "writer"

    async def start(self) -> None:
        self.writer.start()

    async def close(self) -> None:
        await self.writer.stop()
