"""Steering running work from outside (issue 7), on real `python -m taskd` processes: per-queue
slots, pause and resume seen by every process, cancel of a running task in another process (and
cancel racing completion), ctx.cancelled() in a plain def, progress, and decorator defaults."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import functools
import os
import pathlib
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from .conftest import TaskdProcess, submit, wait_until
from .conftest import get_task as get

Start = Callable[..., TaskdProcess]
FINAL = {"completed", "failed", "cancelled", "expired"}


def status(server: TaskdProcess, task_id: int) -> str:
    return get(server, task_id)["status"]


def queue(server: TaskdProcess, name: str) -> dict[str, Any]:
    items = {q["name"]: q for q in server.http.get("/queues").json()["items"]}
    assert name in items, items
    return items[name]


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def started(directory: pathlib.Path) -> set[int]:
    """Ids of the `hold` (or cooperative_sync) tasks that started: start-<id>-<pid> files."""
    return {int(name.split("-")[1]) for name in os.listdir(directory) if name.startswith("start-")}


def ended(directory: pathlib.Path) -> set[int]:
    return {int(name.split("-")[1]) for name in os.listdir(directory) if name.startswith("end-")}


def running_in(directories: list[pathlib.Path]) -> set[int]:
    """Handlers running now, by their files. The start files are listed before the end files,
    so a listing racing the files being written can only miss a running task, never count
    one that ended: a task counted started before the first listing ended and had not ended
    when the second began, so it really ran at that moment."""
    starts: set[int] = set()
    for directory in directories:
        starts |= started(directory)
    ends: set[int] = set()
    for directory in directories:
        ends |= ended(directory)
    return starts - ends


class ConcurrencySampler:
    """Samples, in a thread, how many handlers of each queue run at once (by their files)."""

    def __init__(self, queues: dict[str, list[pathlib.Path]], limits: dict[str, int]) -> None:
        self.queues = queues
        self.limits = limits
        self.peak = dict.fromkeys(queues, 0)
        self.over: list[tuple[str, set[int]]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConcurrencySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, directories in self.queues.items():
                now = running_in(directories)
                self.peak[name] = max(self.peak[name], len(now))
                if len(now) > self.limits[name]:
                    self.over.append((name, now))
            self.samples += 1
            time.sleep(0.005)


def hold_batch(server: TaskdProcess, queue_name: str, n: int, payload: dict[str, Any]) -> list[int]:
    tasks = [{"task_type": "hold", "queue": queue_name, "payload": payload} for _ in range(n)]
    response = server.http.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 201, response.text
    return response.json()["ids"]


# -- 1. per-process queue slots --------------------------------------------------------------------


def test_queue_slots_are_never_exceeded_and_a_busy_queue_does_not_starve_another(
        start_taskd: Start, tmp_path: pathlib.Path) -> None:
    # DEBUG: a failed claim is logged at that level (see the end).
    server = start_taskd("--queues", "default=2,emails=3", LOG_LEVEL="DEBUG")
    assert "workers 5" in server.output, server.output
    default_dir, emails_a, emails_b = (tmp_path / "default", tmp_path / "emails_a", tmp_path / "emails_b")
    for directory in (default_dir, emails_a, emails_b):
        directory.mkdir()
    limits = {"default": 2, "emails": 3}
    with ConcurrencySampler({"default": [default_dir], "emails": [emails_a, emails_b]}, limits) as sampler:
        # One batch, both queues at once. Default is busy: 10 tasks that hold until released,
        # on 2 slots. Emails gets its own 3 slots all the same: its 10 short tasks all run.
        batch = [{"task_type": "hold", "queue": "default", "payload": {"dir": str(default_dir), "seconds": 60}}
                 for _ in range(10)]
        batch += [{"task_type": "hold", "queue": "emails", "payload": {"dir": str(emails_a), "seconds": 0.3}}
                  for _ in range(10)]
        response = server.http.post("/tasks/batch", json={"tasks": batch})
        assert response.status_code == 201, response.text
        default_ids, emails_ids = response.json()["ids"][:10], response.json()["ids"][10:]
        wait_until(lambda: len(started(default_dir)) == 2, timeout=10, what="2 default tasks started")
        wait_until(lambda: queue(server, "emails")["counts"]["completed"] == 10, timeout=10,
                   what="the 10 emails tasks completed while default is busy")
        assert len(started(default_dir)) == 2 and not ended(default_dir), "default must stay at its 2 slots"
        running = server.http.get("/tasks", params={"status": "running", "queue": "default"}).json()["items"]
        assert sorted(t["id"] for t in running) == sorted(started(default_dir))
        counts = queue(server, "default")["counts"]
        assert (counts["running"], counts["pending"]) == (2, 8), counts

        # The other way round: emails busy (3 held, 3 waiting), default drains once released.
        emails_held = hold_batch(server, "emails", 6, {"dir": str(emails_b), "seconds": 60})
        wait_until(lambda: len(started(emails_b)) == 3, timeout=10, what="3 held emails tasks started")
        time.sleep(0.3)  # time to (wrongly) start a fourth
        assert len(started(emails_b)) == 3
        (default_dir / "release").touch()
        wait_until(lambda: queue(server, "default")["counts"]["completed"] == 10, timeout=10,
                   what="default drained while emails is busy")
        assert len(started(emails_b)) == 3, "emails must stay at its 3 slots"
        assert queue(server, "emails")["counts"]["pending"] == 3

        (emails_b / "release").touch()
        wait_until(lambda: queue(server, "emails")["counts"]["completed"] == 16, timeout=10,
                   what="every emails task completed")
    assert not sampler.over, f"more handlers ran at once than the queue has slots: {sampler.over[:5]}"
    assert sampler.samples > 50
    # The slots were used, not just respected.
    assert sampler.peak == {"default": 2, "emails": 3}, sampler.peak
    for task_id in default_ids + emails_ids + emails_held:
        task = get(server, task_id)
        assert (task["status"], task["attempts"], task["crashes"], task["errors"]) == ("completed", 1, 0, []), task
    assert started(default_dir) == ended(default_dir) == set(default_ids)
    assert started(emails_a) | started(emails_b) == set(emails_ids + emails_held)
    # The database was up all along: no claim may fail (two lanes must not collide on one
    # connection). Logged at DEBUG, as a failed claim is (retried) routine in an outage.
    failures = [line for line in server.lines if any(
        text in line for text in ("database unavailable", "claiming failed", "next due time failed", "Traceback"))]
    assert not failures, "".join(failures)


def test_queues_whose_slots_disagree_with_workers_is_a_one_line_start_up_error(start_taskd: Start) -> None:
    server = start_taskd("--queues", "default=2", "--workers", "5", wait=False)
    assert server.wait_exit(30) == 2, server.output
    lines = server.output.splitlines()
    assert len(lines) == 1, server.output
    assert lines[0].startswith("taskd: invalid QUEUES: ") and "2" in lines[0] and "5" in lines[0], lines
    assert "Traceback" not in server.output


# -- 2. pause and resume across processes ------------------------------------------------------------


def test_pause_in_one_process_holds_every_process_and_resume_in_another_releases_at_once(
        start_taskd: Start) -> None:
    a = start_taskd()
    b = start_taskd()
    paused = a.http.post("/queues/emails/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["name"] == "emails" and paused.json()["paused"] is True
    emails = [submit(a if i % 2 else b, "echo", {"i": i}, queue="emails") for i in range(6)]
    default = [submit(b, "echo", {"d": i}) for i in range(3)]
    for task_id in default:
        assert a.http.get(f"/tasks/{task_id}/result", params={"wait": 10}).status_code == 200
    time.sleep(2.0)  # both processes are idle with emails due: neither may claim them
    for task_id in emails:
        task = get(a, task_id)
        assert (task["status"], task["attempts"], task["started_at"]) == ("pending", 0, None), task
    for server in (a, b):
        q = queue(server, "emails")
        assert q["paused"] is True and q["running"] == 0, q
        assert q["counts"] == {"pending": 6, "scheduled": 0, "running": 0, "retrying": 0, "completed": 0,
                               "failed": 0, "cancelled": 0, "expired": 0}, q
        assert q["oldest_wait_seconds"] >= 2.0, q
        d = queue(server, "default")
        assert d["paused"] is False and d["counts"]["completed"] == 3 and d["counts"]["pending"] == 0, d

    resumed_at = time.monotonic()
    resumed = b.http.post("/queues/emails/resume")
    assert resumed.status_code == 200 and resumed.json()["paused"] is False, resumed.text
    wait_until(lambda: all(status(a, t) != "pending" for t in emails), timeout=10, what="emails claimed")
    claimed_after = time.monotonic() - resumed_at
    # The resume wakes idle claimers (a NOTIFY), not their 2 s fallback poll: "about 1 s",
    # with 0.5 s of slack for the HTTP round trips on a loaded 2-core machine.
    assert claimed_after < 1.5, f"emails claimed {claimed_after:.2f}s after the resume"
    for task_id in emails:
        assert a.http.get(f"/tasks/{task_id}/result", params={"wait": 10}).status_code == 200
    assert queue(a, "emails")["paused"] is False and queue(a, "emails")["counts"]["completed"] == 6


# -- 3. cancel ---------------------------------------------------------------------------------------


def test_cancel_a_running_task_from_another_process(start_taskd: Start, tmp_path: pathlib.Path) -> None:
    a = start_taskd()
    b = start_taskd("--workers", "0")
    task_id = submit(a, "hold", {"dir": str(tmp_path), "seconds": 60})
    wait_until(lambda: started(tmp_path) == {task_id}, timeout=15, what="the hold task started")
    assert status(b, task_id) == "running"

    sent = time.monotonic()
    response = b.http.post(f"/tasks/{task_id}/cancel")
    took = time.monotonic() - sent
    assert response.status_code == 200, response.text
    task = response.json()
    # The endpoint waits up to 2 s for the running task to end: it must have ended cancelled.
    # Stopping it takes "within 1 s"; B notices the end of a task another process ran by
    # polling every 0.25 s, hence 1.5 s for the round trip on a loaded machine.
    assert task["status"] == "cancelled", task
    assert took < 1.5, f"cancel took {took:.2f}s"
    # The database's own clock, without B's polling or HTTP: the request to the end.
    stopped_in = (when(task["finished_at"]) - when(task["cancel_requested_at"])).total_seconds()
    assert 0 <= stopped_in < 1.0, task
    assert task["attempts"] == 1 and task["result"] is None
    assert task["last_error"]["type"] == "Cancelled", task
    assert [e["type"] for e in task["errors"]] == ["Cancelled"]
    time.sleep(0.3)
    assert not ended(tmp_path), "the handler ran on after the cancel"

    result = b.http.get(f"/tasks/{task_id}/result")
    assert result.status_code == 200, result.text
    assert result.json()["status"] == "cancelled" and result.json()["error"]["type"] == "Cancelled"
    assert "result" not in result.json()
    again = a.http.post(f"/tasks/{task_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled", again.text
    assert again.json()["finished_at"] == task["finished_at"], "cancelling again changes nothing"
    assert status(a, task_id) == "cancelled"

    done = submit(a, "echo", {"x": 1})
    assert a.http.get(f"/tasks/{done}/result", params={"wait": 10}).status_code == 200
    refused = b.http.post(f"/tasks/{done}/cancel")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "not_cancellable"
    assert refused.json()["error"]["details"] == {"status": "completed"}
    assert get(a, done)["status"] == "completed" and get(a, done)["result"] == {"x": 1}
    assert b.http.post("/tasks/99999/cancel").status_code == 404
    assert "Traceback" not in a.output + b.output


def test_cancel_a_task_not_yet_claimed_ends_it_at_once_and_it_never_runs(
        start_taskd: Start, tmp_path: pathlib.Path) -> None:
    a = start_taskd()
    b = start_taskd("--workers", "0")
    assert a.http.post("/queues/held/pause").status_code == 200
    pending = submit(b, "hold", {"dir": str(tmp_path), "seconds": 0.1}, queue="held")
    scheduled = submit(b, "hold", {"dir": str(tmp_path), "seconds": 0.1}, delay_seconds=1.5)
    assert status(a, pending) == "pending" and status(a, scheduled) == "scheduled"
    for task_id, server in ((pending, a), (scheduled, b)):
        response = server.http.post(f"/tasks/{task_id}/cancel")
        assert response.status_code == 200, response.text
        task = response.json()
        assert task["status"] == "cancelled" and task["attempts"] == 0, task
        assert task["finished_at"] is not None and task["cancel_requested_at"] is not None
        assert task["last_error"]["type"] == "Cancelled" and task["result"] is None, task
    assert a.http.post("/queues/held/resume").status_code == 200
    # Claimable now if still waiting: the queue is resumed and the schedule falls due.
    control = submit(b, "hold", {"dir": str(tmp_path), "seconds": 0.1}, queue="held", delay_seconds=1.5)
    assert a.http.get(f"/tasks/{control}/result", params={"wait": 15}).json()["status"] == "completed"
    time.sleep(0.3)
    assert started(tmp_path) == {control}, "a cancelled task ran"
    for task_id in (pending, scheduled):
        task = get(a, task_id)
        assert (task["status"], task["attempts"], task["started_at"]) == ("cancelled", 0, None), task


def test_cancel_racing_completion_ends_each_task_in_exactly_one_final_state(start_taskd: Start) -> None:
    a = start_taskd()
    b = start_taskd("--workers", "0")
    rng = random.Random(11)
    seconds = [round(rng.uniform(0, 0.2), 3) for _ in range(40)]
    tasks = [{"task_type": "sleep", "payload": {"seconds": s}, "max_retries": 2} for s in seconds]
    # One client per cancel, connected ahead, so the cancels are not held up by connecting.
    clients = [httpx.Client(base_url=(a if i % 2 else b).url, timeout=30) for i in range(len(seconds))]
    for client in clients:
        assert client.get("/tasks", params={"limit": 1}).status_code == 200
    response = a.http.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 201, response.text
    # The batch is claimed about when its reply arrives (they start some 10 ms after they are
    # created, all at once: 50 workers). Each cancel lands about when its task would finish:
    # its sleep later, give or take a few tens of milliseconds, so some land just before the
    # end, some while the outcome is being written, and some just after.
    submitted_at = time.monotonic()
    ids: list[int] = response.json()["ids"]
    offsets = [rng.uniform(-0.08, 0.02) for _ in ids]

    def cancel(i: int) -> tuple[int, dict[str, Any]]:
        delay = submitted_at + seconds[i] + offsets[i] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        reply = clients[i].post(f"/tasks/{ids[i]}/cancel")
        return reply.status_code, reply.json()

    try:
        with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
            replies = list(pool.map(cancel, range(len(ids))))
    finally:
        for client in clients:
            client.close()

    def all_final() -> bool:
        return all(status(a, t) in FINAL for t in ids)

    wait_until(all_final, timeout=15, what="every task final")
    first = {t: get(a, t) for t in ids}
    time.sleep(1.0)
    outcomes = {"completed": 0, "cancelled": 0}
    for i, task_id in enumerate(ids):
        task = first[task_id]
        code, body = replies[i]
        assert task["status"] in ("completed", "cancelled"), task
        assert task["attempts"] == 1, task
        outcomes[task["status"]] += 1
        if task["status"] == "completed":
            assert task["result"] == {"slept": seconds[i]}, task
            assert task["errors"] == [] and task["last_error"] is None, task
            # Cancelled too late: refused (it had finished), or asked while it ran and then
            # kept the result it finished with.
            if code == 409:
                assert body["error"]["code"] == "not_cancellable", body
            else:
                assert code == 200 and body["status"] == "completed", (code, body)
        else:
            assert task["result"] is None, task
            assert task["last_error"]["type"] == "Cancelled", task
            assert [e["type"] for e in task["errors"]] == ["Cancelled"], task
            assert code == 200 and body["status"] == "cancelled", (code, body)
        assert task["finished_at"] is not None, task
        later = get(b, task_id)
        assert (later["status"], later["finished_at"], later["result"], later["errors"]) == (
            task["status"], task["finished_at"], task["result"], task["errors"]), (task, later)
        result = b.http.get(f"/tasks/{task_id}/result")
        assert result.status_code == 200 and result.json()["status"] == task["status"], result.text
    print(f"outcomes of the cancel race: {outcomes}")
    stats = a.http.get("/stats").json()["counts"]
    assert stats["running"] == stats["retrying"] == stats["pending"] == 0, stats
    assert stats["completed"] + stats["cancelled"] == 40, stats


# -- 5. a plain def that asks ctx.cancelled() ---------------------------------------------------------


def test_a_plain_def_handler_sees_that_it_was_cancelled(start_taskd: Start, tmp_path: pathlib.Path) -> None:
    a = start_taskd()
    b = start_taskd("--workers", "0")
    task_id = submit(a, "cooperative_sync", {"dir": str(tmp_path), "seconds": 60})
    wait_until(lambda: started(tmp_path) == {task_id}, timeout=15, what="the plain def started")
    response = b.http.post(f"/tasks/{task_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
    assert response.json()["last_error"]["type"] == "Cancelled"
    stopped = tmp_path / f"stopped-{task_id}"
    wait_until(stopped.exists, timeout=3, what="the thread to notice ctx.cancelled()")
    time.sleep(0.3)  # its "stopped" return value must not overwrite the cancel
    task = get(a, task_id)
    assert (task["status"], task["result"], task["attempts"]) == ("cancelled", None, 1), task


# -- 6. progress ---------------------------------------------------------------------------------------


def test_progress_is_shown_while_running_and_the_last_is_kept(start_taskd: Start) -> None:
    server = start_taskd()
    # Steps 0.8 s apart, closer than the once-a-second writes, so every write brings a new one.
    payload = {"steps": 4, "pause": 0.8}
    jobs = {"progress_async": "step {} of 4", "progress_sync": "sync step {} of 4"}
    ids = {name: submit(server, name, payload) for name in jobs}
    plain = submit(server, "echo", {"no": "progress"})

    def with_progress(task_id: int) -> dict[str, Any] | None:
        task = get(server, task_id)
        return task if task["progress"] is not None else None

    # Both run at once (3.2 s each): read both, then both again a little over a second later.
    firsts = {name: wait_until(functools.partial(with_progress, task_id), timeout=10, what=f"{name} progress")
              for name, task_id in ids.items()}
    time.sleep(1.2)  # progress is written once a second
    laters = {name: get(server, task_id) for name, task_id in ids.items()}
    for name in jobs:
        first, second = firsts[name], laters[name]
        assert first["status"] == second["status"] == "running", (first, second)
        for task in (first, second):
            progress = task["progress"]
            assert set(progress) == {"fraction", "message", "updated_at"}, progress
            step = round(progress["fraction"] * 4)
            assert progress["fraction"] == step / 4 and progress["message"] == jobs[name].format(step), progress
            assert when(progress["updated_at"]).tzinfo is not None
        assert first["progress"]["fraction"] < second["progress"]["fraction"], (first, second)
        assert when(first["progress"]["updated_at"]) < when(second["progress"]["updated_at"])
    for name, task_id in ids.items():
        result = server.http.get(f"/tasks/{task_id}/result", params={"wait": 15})
        assert result.status_code == 200 and result.json()["result"] == "done", result.text
        task = get(server, task_id)
        assert task["progress"]["fraction"] == 1.0, task
        assert task["progress"]["message"] == jobs[name].format(4), task
    assert server.http.get(f"/tasks/{plain}/result", params={"wait": 10}).status_code == 200
    assert get(server, plain)["progress"] is None


# -- 7. decorator defaults -----------------------------------------------------------------------------


def test_decorator_defaults_apply_and_a_request_overrides_them(start_taskd: Start) -> None:
    server = start_taskd()
    plain = submit(server, "emails_default")
    overridden = submit(server, "emails_default", queue="default", priority=-7, max_retries=4)
    zeros = submit(server, "emails_default", priority=0, max_retries=0)
    batch = server.http.post("/tasks/batch", json={"tasks": [{"task_type": "emails_default"},
                                                             {"task_type": "emails_default", "queue": "other"}]})
    assert batch.status_code == 201, batch.text
    in_batch, other_queue = batch.json()["ids"]
    expected = {
        plain: ("emails", 5, 1),
        overridden: ("default", -7, 4),
        zeros: ("emails", 0, 0),
        in_batch: ("emails", 5, 1),
        other_queue: ("other", 5, 1),
    }
    for task_id, want in expected.items():
        task = get(server, task_id)
        assert (task["queue"], task["priority"], task["max_retries"]) == want, task
    for task_id in expected:
        result = server.http.get(f"/tasks/{task_id}/result", params={"wait": 10})
        assert result.status_code == 200 and result.json()["result"] == "sent", result.text
    listed = server.http.get("/tasks", params={"queue": "emails"}).json()["items"]
    assert sorted(t["id"] for t in listed) == sorted([plain, zeros, in_batch])
