"""Counts, rates, timings and the live processes, for /stats, /stats/detailed and /ready.

Imports taskd.store.core, taskd.models, taskd.errors.
"""

from __future__ import annotations

from typing import Any

import trio

from taskd.errors import DatabaseError
from taskd.models import TaskStatus
from taskd.store.core import StoreCore

TIMINGS_WINDOW_SECONDS = 3600.0
TIMELINE_SECONDS = 900.0


class StatsReads(StoreCore):
    queries_used = StoreCore.queries_used | {
        "stats_counts", "stats_recent", "stats_by_type", "stats_timings_by_type", "stats_timeline", "db_ping",
        "process_list_live",
    }

    async def live_processes(self, seen_within: float) -> list[dict[str, Any]]:
        rows = await self._pool.run(self._q["process_list_live"], seen_within)
        return [dict(row) for row in rows]

    async def ping(self) -> bool:
        try:
            with trio.fail_after(2):
                return await self._pool.run(self._q["db_ping"]) is True
        except (DatabaseError, trio.TooSlowError):
            return False

    def pool_usage(self) -> dict[str, int]:
        return self._pool.usage()

    async def counts(self) -> dict[str, int]:
        rows = await self._pool.run(self._q["stats_counts"])
        counts = {status.value: 0 for status in TaskStatus}
        counts.update({row["status"]: row["n"] for row in rows})
        return counts

    async def recent(self, seconds: float) -> dict[str, int]:
        row = await self._pool.run(self._q["stats_recent"], seconds)
        return {"completed": row["completed"], "failed": row["failed"]}

    async def by_type(self) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._pool.run(self._q["stats_by_type"])]

    async def timings_by_type(self, seconds: float = TIMINGS_WINDOW_SECONDS) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._pool.run(self._q["stats_timings_by_type"], seconds)]

    async def timeline(self, seconds: float = TIMELINE_SECONDS) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._pool.run(self._q["stats_timeline"], seconds)]
