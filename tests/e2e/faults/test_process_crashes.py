"""Processes die under load: a handler that takes its process down, kill -9 of one of three.
Real `python -m taskd` processes, real PostgreSQL; what each test measured is printed."""

from __future__ import annotations

import pathlib
import signal
import time
from collections.abc import Callable

import httpx

from tests.e2e.conftest import TaskdProcess

from .conftest import (
    Recording,
    completed_count,
    db_fetch,
    db_try_fetch,
    record_tasks,
    report,
    submit_batch,
    task_rows,
    tracebacks,
    wait_all_finished,
    wait_for,
)

Launch = Callable[..., TaskdProcess]

MAX_CRASHES = 3
MAX_RESTARTS = 6  # the supervisor's bound; the poison may take the process down twice


def test_poison_that_exits_its_process_is_failed_as_crashed_under_a_restarting_supervisor(
    database_url: str, launch_taskd: Launch, record_path: pathlib.Path
) -> None:
    settings = ("--lease-seconds", "1", "--max-crashes", str(MAX_CRASHES))
    server = launch_taskd(database_url, *settings)
    innocent = submit_batch(server, record_tasks(30, 2.0))
    wait_for(lambda: len(Recording(record_path).executions) >= 30, 20, "the 30 tasks running", watch=[server])
    try:
        server.http.post("/tasks", json={"task_type": "exit_process", "payload": {}})
    except httpx.TransportError:
        pass  # the poison may take the process down before the answer is sent
    [poison] = [row["id"] for row in db_fetch(database_url, "SELECT id FROM taskd.tasks"
                                                            " WHERE task_type = 'exit_process'")]

    # The test is the supervisor: a process that exits is replaced, up to a bound.
    exits: list[int] = []
    deadline = time.monotonic() + 90
    while True:
        found = db_try_fetch(database_url, "SELECT status FROM taskd.tasks WHERE id = $1", poison)
        if found and found[0]["status"] in ("completed", "failed"):
            break
        if server.proc.poll() is not None:
            exits.append(server.proc.returncode)
            assert len(exits) <= MAX_RESTARTS, f"the process kept dying: exits {exits}\n{server.output[-3000:]}"
            server = launch_taskd(database_url, *settings, wait=False)
        assert time.monotonic() < deadline, f"the poison task never finished; process exits {exits}"
        time.sleep(0.1)
    counts = wait_all_finished(database_url, 31, 60, what="the 30 tasks beside the poison", watch=[server])
    rows = task_rows(database_url)
    recording = Recording(record_path)
    report("poison exits its process", restarts=len(exits), exit_codes=exits, statuses=dict(counts),
           poison=(rows[poison].status, rows[poison].attempts, rows[poison].crashes,
                   (rows[poison].last_error or {}).get("type")),
           poison_runs=[(run.pid, run.attempt) for run in recording.runs(poison)],
           innocent_crashes=sorted(rows[i].crashes for i in innocent),
           innocent_runs=recording.histogram(), alive=server.proc.poll() is None, tracebacks=tracebacks(server))
    assert rows[poison].status == "failed", rows[poison]
    assert (rows[poison].last_error or {}).get("type") == "Crashed", rows[poison].last_error
    assert 1 <= rows[poison].crashes <= MAX_CRASHES, rows[poison]
    assert 1 <= len(exits) <= MAX_CRASHES - 1, \
        f"the process died {len(exits)} times: the last crash must happen in quarantine, not in taskd"
    assert all(code == 3 for code in exits), f"only the poison's os._exit(3) takes taskd down: {exits}"
    assert all(rows[i].status == "completed" for i in innocent), \
        {i: (rows[i].status, rows[i].crashes, rows[i].error_types) for i in innocent if rows[i].status != "completed"}
    assert server.proc.poll() is None, "the last process is alive"


IN_FLIGHT = 0.5  # s: an outcome produced this shortly before kill -9 may not have reached the database


def test_kill_9_of_one_of_three_processes_reruns_only_the_attempts_it_cut_short(
    database_url: str, launch_taskd: Launch, record_path: pathlib.Path
) -> None:
    servers = [launch_taskd(database_url, "--lease-seconds", "2") for _ in range(3)]
    ids = submit_batch(servers[0], record_tasks(2000, 0.2))
    victim = servers[1]
    survivors = [servers[0], servers[2]]

    def victim_busy_mid_load() -> bool:
        running_on_victim = [r for r in Recording(record_path).on_pid(victim.proc.pid) if r.how is None]
        return completed_count(database_url) >= 400 and len(running_on_victim) >= 10

    wait_for(victim_busy_mid_load, 60, "400 completed and the victim busy", watch=servers)
    victim.signal(signal.SIGKILL)
    killed_at = time.time()
    assert victim.wait_exit(10) == -signal.SIGKILL
    counts = wait_all_finished(database_url, len(ids), 90, what="every task", watch=survivors)
    rows = task_rows(database_url)
    recording = Recording(record_path)
    cut_short = [run for run in recording.on_pid(victim.proc.pid) if run.how is None]
    # Every execution but a task's last must be one the kill cut short: on the victim, never
    # ended (or ended too shortly before the kill for its outcome to be written).
    unexplained, in_flight = [], []
    for runs in recording.duplicated().values():
        for run in runs[:-1]:
            if run.pid != victim.proc.pid or (run.ended and run.finish is not None
                                              and run.finish < killed_at - IN_FLIGHT):
                unexplained.append(str(run))
            elif run.ended:
                in_flight.append(str(run))
    overlapping = recording.overlapping(lambda run: killed_at if run.pid == victim.proc.pid else float("inf"))
    report("kill -9 of one of three", tasks=len(rows), statuses=dict(counts),
           executions=len(recording.executions), runs_per_task=recording.histogram(),
           cut_short=len(cut_short), ended_but_unwritten=len(in_flight), unexplained_duplicates=len(unexplained),
           overlapping=len(overlapping), crashed_tasks=sum(r.crashes > 0 for r in rows.values()),
           survivors_alive=[s.proc.poll() is None for s in survivors],
           tracebacks=[tracebacks(s) for s in survivors])
    assert cut_short, "the kill cut attempts short"
    assert set(counts) == {"completed"}, {i: (r.status, r.error_types) for i, r in rows.items()
                                           if r.status != "completed"}
    assert not unexplained, f"tasks that ran twice though the kill did not cut the first run short: {unexplained[:5]}"
    for run in cut_short:
        runs = recording.runs(run.task_id)
        assert runs[-1].ended and runs[-1].pid != victim.proc.pid, [str(r) for r in runs]
        row = rows[run.task_id]
        assert row.crashes >= 1 and "LeaseExpired" in row.error_types, row
    assert not overlapping, f"one task ran twice at once: {[tuple(map(str, p)) for p in overlapping[:3]]}"
    assert all(s.proc.poll() is None for s in survivors)
