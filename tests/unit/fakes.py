"""An in-memory stand-in for taskd.store.Store, enough for the workers and the API."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Any

import trio
import trio.lowlevel

from taskd import jsontext
from taskd.models import ClaimedTask, NewTask, Outcome, Submitted, Task, TaskPage, TaskStatus, TaskSummary
from taskd.store import WorkSignal


class FakeStore:
    def __init__(self) -> None:
        self.process_id = "fake"
        self.tasks: dict[int, dict[str, Any]] = {}
        self.outcomes: list[Outcome] = []
        self.claim_requests: list[int] = []
        self.submitted: list[NewTask] = []
        self._signals: list[WorkSignal] = []
        self.progress: list[tuple[int, int, str]] = []
        self._cancel: list[Callable[[int, int], None]] = []
        self.finished_event = trio.Event()
        self.heartbeats: list[list[tuple[int, int]]] = []
        self.running_at_claim: list[int] = []
        self.skips: list[list[int]] = []
        self.released: list[tuple[int, int]] = []
        self._written: list[Callable[[Sequence[Outcome], set[tuple[int, int]]], None]] = []

    # submitting
    def add(self, task_type: str, payload: Any, *, max_retries: int = 3, timeout: float = 60.0,
            priority: int = 0, queue: str = "default") -> int:
        task_id = len(self.tasks) + 1
        self.tasks[task_id] = {"id": task_id, "task_type": task_type, "payload": payload, "status": "pending",
                               "attempts": 0, "max_retries": max_retries, "timeout": timeout,
                               "result": None, "errors": [], "run_at": 0.0, "crashes": 0, "priority": priority,
                               "snoozes": 0, "queue": queue, "progress": None}
        self.wake_claimer()
        return task_id

    async def submit(self, task: NewTask) -> Submitted:
        self.submitted.append(task)
        task_id = self.add(task.task_type, jsontext.loads(task.payload_json), max_retries=task.max_retries,
                           timeout=task.timeout_seconds, priority=task.priority, queue=task.queue)
        return Submitted(task_id, True, TaskStatus.SCHEDULED if task.starts_later else TaskStatus.PENDING)

    async def submit_many(self, tasks: Sequence[NewTask]) -> list[Submitted]:
        return [await self.submit(t) for t in tasks]

    # workers
    def on_cancel(self, callback: Callable[[int, int], None]) -> None:
        self._cancel.append(callback)

    def cancel(self, task_id: int) -> None:
        """Delete the task (a running one is told to stop)."""
        row = self.tasks.pop(task_id, None)
        if row is not None:
            for callback in self._cancel:
                callback(task_id, row["attempts"])

    def request_cancel(self, task_id: int, *, notify: bool = True) -> None:
        """Ask a running task to stop; without the notice, the heartbeat finds out."""
        self.tasks[task_id]["cancel_requested"] = True
        if notify:
            for callback in self._cancel:
                callback(task_id, self.tasks[task_id]["attempts"])

    def work_signal(self) -> WorkSignal:
        signal = WorkSignal()
        self._signals.append(signal)
        return signal

    def wake_claimer(self) -> None:
        for signal in self._signals:
            signal.set()

    async def claim(self, limit: int, task_types: Sequence[str], lease: float,
                    skip: Sequence[int] = (), queues: Sequence[str] | None = None) -> list[ClaimedTask]:
        self.claim_requests.append(limit)
        self.skips.append(list(skip))
        self.running_at_claim.append(sum(1 for r in self.tasks.values() if r["status"] == "running"))
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        claimed = []
        for row in sorted(self.tasks.values(), key=lambda r: (-r["priority"], r["run_at"], r["id"])):
            if len(claimed) >= limit:
                break
            if (row["status"] in ("pending", "retrying") and row["run_at"] <= now and row["task_type"] in task_types
                    and row["id"] not in skip and (queues is None or row["queue"] in queues)):
                row["status"] = "running"
                row["attempts"] += 1
                payload_json = row.get("payload_json") or json.dumps(row["payload"])
                claimed.append(ClaimedTask(row["id"], row["task_type"], payload_json, row["attempts"],
                                           row["max_retries"], row["timeout"], row["crashes"], row["snoozes"]))
        return claimed

    async def waiting_queues(self) -> list[str]:
        return sorted({r["queue"] for r in self.tasks.values() if r["status"] in ("pending", "retrying")})

    async def seconds_until_due(self, task_types: Sequence[str], skip: Sequence[int] = (),
                                queues: Sequence[str] | None = None) -> float | None:
        due = [r["run_at"] for r in self.tasks.values()
               if r["status"] in ("pending", "retrying") and r["id"] not in skip
               and (queues is None or r["queue"] in queues)]
        return min(due) - trio.current_time() if due else None

    async def heartbeat(self, lease: float, held: Sequence[tuple[int, int]], workers: int,
                        busy: int) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
        self.heartbeats.append(list(held))
        renewed = {(i, a) for i, a in held
                   if i in self.tasks and self.tasks[i]["attempts"] == a and self.tasks[i]["status"] == "running"}
        return renewed, {(i, a) for i, a in renewed if self.tasks[i].get("cancel_requested")}

    async def write_progress(self, progress: Sequence[tuple[int, int, str]]) -> None:
        self.progress.extend(progress)
        for task_id, _attempt, text in progress:
            if task_id in self.tasks:
                self.tasks[task_id]["progress"] = jsontext.loads(text)

    def on_outcomes_written(self, callback: Callable[[Sequence[Outcome], set[tuple[int, int]]], None]) -> None:
        self._written.append(callback)

    async def record(self, outcome: Outcome) -> None:
        written = await self.finish(outcome)
        for callback in self._written:
            callback([outcome], {(outcome.task_id, outcome.attempt)} if written else set())

    async def release(self, claims: Sequence[tuple[int, int]], *, from_heartbeat: bool = False) -> None:
        self.released.extend(claims)
        for task_id, attempt in claims:
            row = self.tasks.get(task_id)
            if row is not None and row["attempts"] == attempt and row["status"] == "running":
                row["status"] = "pending"
                row["attempts"] -= 1

    async def finish(self, outcome: Outcome) -> bool:
        await trio.lowlevel.checkpoint()
        row = self.tasks.get(outcome.task_id)
        if row is None or row["attempts"] != outcome.attempt or row["status"] != "running":
            return False
        self.outcomes.append(outcome)
        row["status"] = outcome.status.value
        if outcome.status == TaskStatus.RETRYING and row.get("cancel_requested"):
            row["status"] = "cancelled"
        if outcome.progress_json is not None:
            row["progress"] = jsontext.loads(outcome.progress_json)
        row["result"] = jsontext.loads(outcome.result_json)
        if outcome.error_json:
            row["errors"].append(jsontext.loads(outcome.error_json))
        if outcome.status == TaskStatus.RETRYING:
            row["run_at"] = trio.current_time() + outcome.retry_delay
        row["snoozes"] += outcome.snoozed
        if all(r["status"] in ("completed", "failed", "cancelled") for r in self.tasks.values()):
            self.finished_event.set()
        return True

    # reading
    def _task(self, row: dict[str, Any]) -> Task:
        now = dt.datetime.now(dt.UTC)
        last_error = row["errors"][-1] if row["errors"] else None
        return Task(row["id"], row["task_type"], TaskStatus(row["status"]), json.dumps(row["payload"]),
                    None if row["result"] is None else json.dumps(row["result"]), row["attempts"],
                    row["max_retries"], row["crashes"], row["timeout"], now, None, None,
                    None if last_error is None else json.dumps(last_error), json.dumps(row["errors"]),
                    row["priority"], queue=row["queue"],
                    progress_json=None if row["progress"] is None else json.dumps(row["progress"]))

    def _summary(self, row: dict[str, Any]) -> TaskSummary:
        last_error = row["errors"][-1] if row["errors"] else None
        return TaskSummary(row["id"], row["task_type"], TaskStatus(row["status"]), row["attempts"],
                           row["max_retries"], row["crashes"], dt.datetime.now(dt.UTC), None, None,
                           last_error is not None, last_error and last_error.get("type"),
                           last_error and str(last_error.get("message"))[:500], row["priority"],
                           queue=row["queue"])

    def _listed(self, status: str | None, task_type: str | None, before_id: int | None) -> list[dict[str, Any]]:
        return [r for r in sorted(self.tasks.values(), key=lambda r: -r["id"])
                if (status is None or r["status"] == status) and (task_type is None or r["task_type"] == task_type)
                and (before_id is None or r["id"] < before_id)]

    async def get(self, task_id: int) -> Task | None:
        row = self.tasks.get(task_id)
        return None if row is None else self._task(row)

    async def wait_finished(self, task_id: int, seconds: float) -> Task | None:
        return await self.get(task_id)

    async def list_summaries(self, *, status: str | None, task_type: str | None, before_id: int | None,
                             limit: int, queue: str | None = None) -> list[TaskSummary]:
        return [self._summary(r) for r in self._listed(status, task_type, before_id)[:limit]]

    async def list_tasks(self, *, status: str | None, task_type: str | None, before_id: int | None,
                         limit: int, max_bytes: int | None = None, queue: str | None = None) -> TaskPage:
        # Cut like the real store: by the JSON text of the rows, never below one row.
        rows = self._listed(status, task_type, before_id)[:limit]
        tasks: list[Task] = []
        total = 0
        for row in rows:
            task = self._task(row)
            total += len(task.payload_json) + len(task.result_json or "null") + len(task.errors_json)
            if tasks and max_bytes is not None and total > max_bytes:
                break
            tasks.append(task)
        more = len(tasks) < len(rows) or len(rows) == limit
        return TaskPage(tasks, tasks[-1].id if more else None)

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
