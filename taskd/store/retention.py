"""Retention: deleting finished tasks once they are old enough, a batch at a time.

Each batch is one statement in its own short transaction, under an advisory lock that
ends with it, so no connection of the pool is left holding a lock and a pruner that
dies holds nothing. The loop that decides when and how much is taskd.retention.
Imports taskd.store.core.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from taskd.store.core import StoreCore


@dataclasses.dataclass(frozen=True, slots=True)
class PruneBatch:
    """What one prune statement did."""

    locked: bool  # False: another process was pruning, and nothing was deleted
    deleted: int
    reached: dt.datetime | None  # the latest finished_at deleted: where the next batch may start


class Retention(StoreCore):
    queries_used = StoreCore.queries_used | {"task_prune_settings", "task_prune"}

    async def prune_finished(self, status: str, older_than: float, limit: int,
                             after: dt.datetime | None = None) -> PruneBatch:
        """Delete up to `limit` tasks in final `status` that finished more than `older_than`
        seconds ago (and not before `after`), oldest first, unless another process is pruning."""
        # A transaction of its own only for the planner settings (they end with it): the
        # pool's connections keep their defaults for everything else.
        async with self._pool.transaction() as conn:
            await conn.run(self._q["task_prune_settings"])
            row = await conn.run(self._q["task_prune"], status, older_than, limit, after)
        return PruneBatch(row["locked"], row["deleted"], row["reached"])
