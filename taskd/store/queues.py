"""Queues: their counts and waiting times, and pausing them.

Imports taskd.store.core.
"""

from __future__ import annotations

from typing import Any

from taskd.store.core import StoreCore


class QueueControl(StoreCore):
    queries_used = StoreCore.queries_used | {"queue_list", "queue_set_paused"}

    async def queues(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every queue that holds a task or was paused (or only `name`), with its counts."""
        return [dict(row) for row in await self._pool.run(self._q["queue_list"], name)]

    async def set_paused(self, name: str, paused: bool) -> dict[str, Any]:
        """Pause or resume a queue (it need not hold any task yet); the queue as it is now."""
        await self._pool.run(self._q["queue_set_paused"], name, paused)
        (queue,) = await self.queues(name)
        return queue
