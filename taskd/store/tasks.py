"""Reading one task or a page of them, and steering them: delete, cancel, retry, one or in bulk.

Imports taskd.store.core, taskd.rows, taskd.models.
"""

from __future__ import annotations

import datetime as dt

import trio

from taskd.models import Status, Task, TaskPage, TaskSummary
from taskd.rows import parse_status, summary_from_row, task_from_row
from taskd.store.core import StoreCore

# Bulk cancel and retry work in statements of this many rows, so no statement holds
# many row locks for long (and a huge filter does not become one huge transaction).
BULK_CHUNK = 1000


class TaskControl(StoreCore):
    queries_used = StoreCore.queries_used | {
        "task_get", "task_list", "task_list_sizes", "task_list_full", "task_delete", "task_cancel",
        "task_cancel_where", "task_retry", "task_retry_where", "db_now",
    }

    async def get(self, task_id: int) -> Task | None:
        row = await self._pool.run(self._q["task_get"], task_id)
        return None if row is None else task_from_row(row)

    async def list_summaries(
        self, *, status: str | None, task_type: str | None, before_id: int | None, limit: int,
        queue: str | None = None,
    ) -> list[TaskSummary]:
        """Up to `limit` task summaries, newest first; payloads, results and error histories are not read."""
        rows = await self._pool.run(self._q["task_list"], status, task_type, before_id, limit, queue)
        return [summary_from_row(row) for row in rows]

    async def list_tasks(
        self, *, status: str | None, task_type: str | None, before_id: int | None, limit: int,
        max_bytes: int | None = None, queue: str | None = None,
    ) -> TaskPage:
        """Up to `limit` full tasks, newest first, cut short once their JSON would pass
        `max_bytes` (but never empty while any is left)."""
        # Sizes first, so what this process fetches is bounded by max_bytes (plus
        # one row, should the first alone be larger), not by limit x the largest row.
        sizes = await self._pool.run(self._q["task_list_sizes"], status, task_type, before_id, limit, queue)
        chosen: list[int] = []
        total = 0
        for row in sizes:
            total += row["json_bytes"]
            if chosen and max_bytes is not None and total > max_bytes:
                break
            chosen.append(row["id"])
        more = len(chosen) < len(sizes) or len(sizes) == limit
        rows = await self._pool.run(self._q["task_list_full"], chosen) if chosen else []
        return TaskPage([task_from_row(row) for row in rows], chosen[-1] if more else None)

    async def delete(self, task_id: int) -> Status | None:
        """Delete a task; returns the status it had, None if there was none."""
        status = await self._pool.run(self._q["task_delete"], task_id)
        if status is None:
            return None
        self._signal_finished([task_id])
        return parse_status(status)

    async def cancel(self, task_id: int) -> tuple[bool, Task | None]:
        """Cancel a task: a waiting one ends cancelled now; a running one is asked to stop (its
        process cancels it). (Whether it was waiting or running, the task as it is now.)"""
        cancelled = await self._pool.run(self._q["task_cancel"], task_id) is not None
        if cancelled:
            self._signal_finished([task_id])
        return cancelled, await self.get(task_id)

    async def retry(self, task_id: int) -> tuple[bool, Task | None]:
        """Run a failed, cancelled or expired task again; (whether it was, the task as it is now)."""
        row = await self._pool.run(self._q["task_retry"], task_id)
        if row is not None:
            self.wake_claimer()
            return True, task_from_row(row)
        return False, await self.get(task_id)

    async def cancel_where(self, *, status: str | None, task_type: str | None, queue: str | None,
                           created_before: dt.datetime | None) -> int:
        """Cancel every waiting or running task matching the filters and submitted before the call;
        how many."""
        started = await self._pool.run(self._q["db_now"])
        total = 0
        while True:
            done = await self._pool.run(self._q["task_cancel_where"], status, task_type, queue, created_before,
                                        BULK_CHUNK, started)
            total += done
            if done < BULK_CHUNK:
                return total
            await trio.lowlevel.checkpoint()

    async def retry_where(self, *, status: str | None, task_type: str | None, queue: str | None,
                          finished_before: dt.datetime | None) -> int:
        """Retry every failed, cancelled or expired task matching the filters; how many."""
        started = await self._pool.run(self._q["db_now"])
        total = 0
        while True:
            done = await self._pool.run(self._q["task_retry_where"], status, task_type, queue, finished_before,
                                        started, BULK_CHUNK)
            total += done
            if done:
                self.wake_claimer()
            if done < BULK_CHUNK:
                return total
            await trio.lowlevel.checkpoint()

    async def wait_finished(self, task_id: int, seconds: float) -> Task | None:
        """The task once it is finished (completed, failed, cancelled, expired), or as it is after `seconds`."""
        deadline = trio.current_time() + seconds
        # Registered before reading, so a finish between the read and the wait is not
        # missed; the short poll covers tasks finished by other processes.
        event = self._finish_events.setdefault(task_id, trio.Event())
        try:
            while True:
                task = await self.get(task_id)
                remaining = deadline - trio.current_time()
                if task is None or task.finished or remaining <= 0:
                    return task
                with trio.move_on_after(min(remaining, 0.25)):
                    await event.wait()
                if event.is_set():
                    event = self._finish_events.setdefault(task_id, trio.Event())
        finally:
            # Drop the registration unless another waiter still shares it.
            if self._finish_events.get(task_id) is event and not event.statistics().tasks_waiting:
                del self._finish_events[task_id]
