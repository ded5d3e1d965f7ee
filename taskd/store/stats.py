"""Counts, rates, timings and the live processes, for /stats, /stats/detailed and /ready;
and the upkeep of the kept counts they read (folding deltas, checking against a full count).

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
CHECK_TIMEOUT = 3600.0


class StatsReads(StoreCore):
    queries_used = StoreCore.queries_used | {
        "stats_counts", "stats_recent", "stats_by_type", "stats_timings_by_type", "stats_timeline", "db_ping",
        "process_list_live", "counts_lock", "counts_fold", "counts_drop_zeros", "finished_fold", "latency_fold",
        "buckets_prune", "counts_check_due", "counts_check_isolation", "counts_check",
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

    async def fold_counts(self) -> int | None:
        """Fold the deltas the triggers appended into the kept totals and buckets, and forget
        buckets too old to show; how many count deltas were folded (None: another process is
        folding right now)."""
        async with self._pool.transaction() as conn:
            if not await conn.run(self._q["counts_lock"]):
                return None
            folded: int = await conn.run(self._q["counts_fold"])
            await conn.run(self._q["counts_drop_zeros"])
            await conn.run(self._q["finished_fold"])
            await conn.run(self._q["latency_fold"])
            await conn.run(self._q["buckets_prune"])
            return folded

    async def check_counts(self, every: float) -> int | None:
        """If no process did it in the last `every` seconds, compare the kept counts with a
        full count of the task table and correct them; by how many tasks they were off
        (None: not done now)."""
        async with self._pool.transaction() as conn:
            await conn.run(self._q["counts_check_isolation"])
            if not await conn.run(self._q["counts_lock"]):
                return None
            if not await conn.run(self._q["counts_check_due"], every):
                return None
            # A full count: minutes on a table of tens of millions of rows, not the usual limit.
            off: int = await conn.run(self._q["counts_check"], command_timeout=CHECK_TIMEOUT)
            return off
