"""An in-memory stand-in for taskd.store.Store, enough for the workers and the API."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import trio
import trio.lowlevel

from taskd import jsontext
from taskd.models import ClaimedTask, NewTask, Outcome, Task, TaskStatus


class FakeStore:
    def __init__(self) -> None:
        self.process_id = "fake"
        self.tasks: dict[int, dict[str, Any]] = {}
        self.outcomes: list[Outcome] = []
        self.claim_requests: list[int] = []
        self.submitted: list[NewTask] = []
        self._new_work = trio.Event()
        self._cancel: list[Callable[[int], None]] = []
        self.finished_event = trio.Event()
        self.heartbeats: list[list[tuple[int, int]]] = []
        self.running_at_claim: list[int] = []

    # submitting
    def add(self, task_type: str, payload: Any, *, max_retries: int = 3, timeout: float = 60.0) -> int:
        task_id = len(self.tasks) + 1
        self.tasks[task_id] = {"id": task_id, "task_type": task_type, "payload": payload, "status": "pending",
                               "attempts": 0, "max_retries": max_retries, "timeout": timeout,
                               "result": None, "errors": [], "run_at": 0.0}
        self._new_work.set()
        return task_id

    async def submit(self, task: NewTask) -> int:
        self.submitted.append(task)
        return self.add(task.task_type, jsontext.loads(task.payload_json),
                        max_retries=task.max_retries, timeout=task.timeout_seconds)

    async def submit_many(self, tasks: Sequence[NewTask]) -> list[int]:
        return [await self.submit(t) for t in tasks]

    # workers
    def on_cancel(self, callback: Callable[[int], None]) -> None:
        self._cancel.append(callback)

    def cancel(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)
        for callback in self._cancel:
            callback(task_id)

    def clear_new_work(self) -> None:
        if self._new_work.is_set():
            self._new_work = trio.Event()

    async def wait_for_work(self) -> None:
        await self._new_work.wait()

    async def claim(self, limit: int, task_types: Sequence[str], lease: float) -> list[ClaimedTask]:
        self.claim_requests.append(limit)
        self.running_at_claim.append(sum(1 for r in self.tasks.values() if r["status"] == "running"))
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        claimed = []
        for row in self.tasks.values():
            if len(claimed) >= limit:
                break
            if row["status"] in ("pending", "retrying") and row["run_at"] <= now and row["task_type"] in task_types:
                row["status"] = "running"
                row["attempts"] += 1
                claimed.append(ClaimedTask(row["id"], row["task_type"], row["payload"], row["attempts"],
                                           row["max_retries"], row["timeout"]))
        return claimed

    async def seconds_until_due(self, task_types: Sequence[str]) -> float | None:
        due = [r["run_at"] for r in self.tasks.values() if r["status"] in ("pending", "retrying")]
        return min(due) - trio.current_time() if due else None

    async def heartbeat(self, lease: float, held: Sequence[tuple[int, int]], workers: int,
                        busy: int) -> set[tuple[int, int]]:
        self.heartbeats.append(list(held))
        return {(i, a) for i, a in held
                if i in self.tasks and self.tasks[i]["attempts"] == a and self.tasks[i]["status"] == "running"}

    async def record(self, outcome: Outcome) -> None:
        await self.finish(outcome)

    async def finish(self, outcome: Outcome) -> bool:
        await trio.lowlevel.checkpoint()
        row = self.tasks.get(outcome.task_id)
        if row is None or row["attempts"] != outcome.attempt or row["status"] != "running":
            return False
        self.outcomes.append(outcome)
        row["status"] = outcome.status.value
        row["result"] = jsontext.loads(outcome.result_json)
        if outcome.error_json:
            row["errors"].append(jsontext.loads(outcome.error_json))
        if outcome.status == TaskStatus.RETRYING:
            row["run_at"] = trio.current_time() + outcome.retry_delay
        if all(r["status"] in ("completed", "failed") for r in self.tasks.values()):
            self.finished_event.set()
        return True

    # reading
    def _task(self, row: dict[str, Any]) -> Task:
        now = dt.datetime.now(dt.UTC)
        return Task(row["id"], row["task_type"], TaskStatus(row["status"]), row["payload"], row["result"],
                    row["attempts"], row["max_retries"], row["timeout"], now, None, None,
                    row["errors"][-1] if row["errors"] else None, row["errors"])

    async def get(self, task_id: int) -> Task | None:
        row = self.tasks.get(task_id)
        return None if row is None else self._task(row)

    async def wait_finished(self, task_id: int, seconds: float) -> Task | None:
        return await self.get(task_id)

    async def list_tasks(self, *, status: str | None, task_type: str | None, before_id: int | None,
                         limit: int) -> list[Task]:
        rows = [r for r in sorted(self.tasks.values(), key=lambda r: -r["id"])
                if (status is None or r["status"] == status) and (task_type is None or r["task_type"] == task_type)
                and (before_id is None or r["id"] < before_id)]
        return [self._task(r) for r in rows[:limit]]

    async def delete(self, task_id: int) -> TaskStatus | None:
        row = self.tasks.get(task_id)
        if row is None:
            return None
        self.cancel(task_id)
        return TaskStatus(row["status"])

    async def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in TaskStatus}
        for row in self.tasks.values():
            counts[row["status"]] += 1
        return counts

    async def recent(self, seconds: float) -> dict[str, int]:
        counts = await self.counts()
        return {"completed": counts["completed"], "failed": counts["failed"]}

    async def by_type(self) -> list[dict[str, Any]]:
        return []

    async def timings_by_type(self) -> list[dict[str, Any]]:
        return []

    async def timeline(self) -> list[dict[str, Any]]:
        return []

    async def live_processes(self, seen_within: float) -> list[dict[str, Any]]:
        return []

    def pool_usage(self) -> dict[str, int]:
        return {"size": 0, "idle": 0, "max": 0}

    async def ping(self) -> bool:
        return True
