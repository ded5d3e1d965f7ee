"""The database goes away under load: restarted, its connections killed, the network partitioned.
Real `python -m taskd` processes, real PostgreSQL; what each test measured is printed."""

from __future__ import annotations

import asyncio
import functools
import pathlib
import signal
import time
from collections.abc import Callable

import asyncpg

from tests.e2e.conftest import TaskdProcess

from .conftest import (
    HttpProbe,
    PrivateCluster,
    Recording,
    TcpProxy,
    completed_count,
    db_try_fetch,
    ready_status,
    record_tasks,
    report,
    status_counts,
    submit_batch,
    task_rows,
    tracebacks,
    wait_all_finished,
    wait_for,
)

Launch = Callable[..., TaskdProcess]


def at_least_completed(url: str, count: int) -> bool:
    return completed_count(url) >= count


def answers_ready(server: TaskdProcess, status: int) -> bool:
    return ready_status(server) == status


def test_postgres_restarted_twice_mid_load_loses_nothing_and_answers_503_not_500(
    private_pg: PrivateCluster, launch_taskd: Launch, record_path: pathlib.Path
) -> None:
    url = private_pg.url
    servers = [launch_taskd(url, "--lease-seconds", "4") for _ in range(2)]
    ids = submit_batch(servers[0], record_tasks(1000, 0.5))
    # (stopped, back up, both /ready 200 again) per restart
    windows: list[tuple[float, float, float]] = []
    with HttpProbe(servers) as probe:
        # A clean restart ("fast": every session is terminated), then a crash ("immediate": the
        # server recovers from its WAL at start).
        for threshold, mode in ((150, "fast"), (500, "immediate")):
            wait_for(functools.partial(at_least_completed, url, threshold), 90, f"{threshold} completed",
                     watch=servers)
            stopped = time.time()
            private_pg.stop(mode)
            assert completed_count(url) == -1, "the cluster is down"
            for server in servers:
                wait_for(functools.partial(answers_ready, server, 503), 15, f"/ready 503 on port {server.port}")
            # Down for at least 2 s (half the lease): attempts end meanwhile and their outcomes
            # must wait for the database. The fault's length, not a wait for something.
            time.sleep(max(0.0, stopped + 2.0 - time.time()))
            private_pg.start()
            back = time.time()
            left = status_counts(url)
            assert left is not None and left["completed"] < len(ids), f"the restart came after the work: {left}"
            for server in servers:
                wait_for(functools.partial(answers_ready, server, 200), 30,
                         f"/ready 200 again on port {server.port}")
            windows.append((stopped, back, time.time()))
    counts = wait_all_finished(url, len(ids) + len(probe.submitted), 120, what="every task", watch=servers)
    rows = task_rows(url)
    recording = Recording(record_path)
    # Recovery: from the cluster being back to the first task completed after it.
    recovery = [min((r.finished_at for r in rows.values() if r.finished_at and r.finished_at > back), default=None)
                for _, back, _ in windows]
    recovery_s = [None if first is None else round(first - back, 3)
                  for first, (_, back, _) in zip(recovery, windows, strict=True)]
    duplicated = recording.duplicated()
    # A second execution is allowed only after one the restart cut short: it never ended, or
    # it ran while the cluster was down or coming back.
    unexplained = [str(run) for runs in duplicated.values() for run in runs[:-1]
                   if run.ended and not any(run.intersects(stopped, ready) for stopped, _, ready in windows)]
    overlapping = recording.overlapping()
    report("postgres restarted twice", tasks=len(rows), statuses=dict(counts),
           executions=len(recording.executions), runs_per_task=recording.histogram(),
           duplicates=len(duplicated), unexplained_duplicates=len(unexplained), overlapping=len(overlapping),
           downtime_s=[round(back - stopped, 3) for stopped, back, _ in windows],
           until_ready_s=[round(ready - back, 3) for _, back, ready in windows], recovery_s=recovery_s,
           http=dict(probe.statuses), transport_errors=dict(probe.transport_errors),
           process_exits=[s.proc.poll() for s in servers], tracebacks=[tracebacks(s) for s in servers])
    assert all(s.proc.poll() is None for s in servers), "both processes outlive the restarts"
    assert not probe.bad, f"HTTP 5xx other than 503 during the restarts: {probe.bad[:5]}"
    assert probe.statuses[201] > 0, "the probe got tasks in"
    assert all(rows[i].status == "completed" for i in [*ids, *probe.submitted]), \
        {i: rows[i].status for i in [*ids, *probe.submitted] if rows[i].status != "completed"}
    assert set(counts) == {"completed"}, counts
    assert all(recording.runs(i) for i in ids), "every task ran"
    assert not unexplained, f"tasks that ran twice though nothing cut the first run short: {unexplained[:5]}"
    assert not overlapping, f"one task ran twice at the same time: {[tuple(map(str, p)) for p in overlapping[:3]]}"
    assert all(first is not None for first in recovery), "tasks completed after each restart"


def terminate_taskd_backends(url: str, rounds: int, spacing: float) -> list[int]:
    """pg_terminate_backend every other backend of the database, `rounds` times; the number
    terminated each round."""

    async def run() -> list[int]:
        admin = await asyncpg.connect(url, timeout=10)
        killed = []
        try:
            for _ in range(rounds):
                killed.append(await admin.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND backend_type = 'client backend'", timeout=10))
                await asyncio.sleep(spacing)  # the fault's schedule, not a wait for something
        finally:
            await admin.close(timeout=10)
        return killed

    return asyncio.run(run())


def test_connections_killed_ten_times_lose_no_task_and_spend_no_retry(
    database_url: str, launch_taskd: Launch, record_path: pathlib.Path
) -> None:
    servers = [launch_taskd(database_url, "--max-retries", "0") for _ in range(2)]
    ids = submit_batch(servers[0], record_tasks(2000, 0.25))
    wait_for(lambda: len(Recording(record_path).executions) >= 50, 30, "work under way", watch=servers)
    with HttpProbe(servers) as probe:
        killed = terminate_taskd_backends(database_url, rounds=10, spacing=0.3)
        at_last_kill = status_counts(database_url)
    counts = wait_all_finished(database_url, len(ids) + len(probe.submitted), 120, what="every task",
                               watch=servers)
    rows = task_rows(database_url)
    recording = Recording(record_path)
    report("connections killed", tasks=len(rows), statuses=dict(counts), killed_per_round=killed,
           at_last_kill=dict(at_last_kill or {}), executions=len(recording.executions),
           runs_per_task=recording.histogram(), duplicates=len(recording.duplicated()),
           crashes=sum(r.crashes for r in rows.values()), http=dict(probe.statuses),
           transport_errors=dict(probe.transport_errors), process_exits=[s.proc.poll() for s in servers],
           tracebacks=[tracebacks(s) for s in servers])
    assert killed[0] >= 2, f"the first round found taskd's connections to kill: {killed}"
    assert at_last_kill is None or at_last_kill["completed"] < len(ids), "the kills came during the work"
    assert all(s.proc.poll() is None for s in servers), "both processes outlive the killed connections"
    assert not probe.bad, f"HTTP 5xx other than 503: {probe.bad[:5]}"
    failed = {i: r.last_error for i, r in rows.items() if r.status == "failed"}
    assert not failed, f"{len(failed)} tasks failed (max-retries 0: a lost connection spent a retry?): " \
                       f"{list(failed.items())[:3]}"
    assert set(counts) == {"completed"}, counts
    assert all(rows[i].status == "completed" for i in [*ids, *probe.submitted])
    assert not recording.overlapping(), "one task ran twice at the same time"


def test_partition_longer_than_the_lease_never_runs_one_task_twice_at_once(
    database_url: str, launch_taskd: Launch, tcp_proxy: Callable[[str], tuple[TcpProxy, str]],
    record_path: pathlib.Path,
) -> None:
    proxy, proxied_url = tcp_proxy(database_url)
    settings = ("--lease-seconds", "2", "--max-retries", "0")
    # A reaches the database through the proxy and holds ten long tasks; B, direct, runs the rest.
    a = launch_taskd(proxied_url, *settings, "--workers", "10")
    long_ids = submit_batch(a, record_tasks(10, 10.0))
    wait_for(lambda: len(Recording(record_path).on_pid(a.proc.pid)) == 10, 20, "A running the 10 long tasks",
             watch=[a])
    short_ids = submit_batch(a, record_tasks(150, 1.0))
    b = launch_taskd(database_url, *settings)
    wait_for(lambda: sum(r.ended for r in Recording(record_path).on_pid(b.proc.pid)) >= 20, 30,
             "B under way", watch=[a, b])

    paused = time.time()
    proxy.pause()

    def long_tasks_taken_over() -> bool:
        # Each long task either started again on B, or was finished (failed) without that.
        rerun = {r.task_id for r in Recording(record_path).on_pid(b.proc.pid)}
        rows = db_try_fetch(database_url, "SELECT id FROM taskd.tasks WHERE id = ANY($1::bigint[])"
                                          " AND status IN ('completed', 'failed')", long_ids)
        return rows is not None and set(long_ids) <= rerun | {row["id"] for row in rows}

    wait_for(long_tasks_taken_over, 30, "B taking over the long tasks", watch=[a, b])
    # The partition lasts at least 6 s, three leases: the fault itself, not a wait for something.
    time.sleep(max(0.0, paused + 6.0 - time.time()))
    proxy.resume()
    resumed = time.time()
    wait_for(lambda: ready_status(a) == 200, 30, "A ready again", watch=[a])
    counts = wait_all_finished(database_url, len(long_ids) + len(short_ids), 60, what="every task", watch=[a, b])
    rows = task_rows(database_url)
    recording = Recording(record_path)
    on_a_long = [run for run in recording.on_pid(a.proc.pid) if run.task_id in long_ids]
    overlapping = recording.overlapping()
    ended_but_failed = [i for i, r in rows.items() if r.status == "failed" and any(x.ended for x in recording.runs(i))]

    # A works again: B stops, A alone runs new tasks.
    b.signal(signal.SIGTERM)
    b_exit = b.wait_exit(60)
    after_ids = submit_batch(a, record_tasks(5, 0.0))
    wait_all_finished(database_url, len(rows) + 5, 30, what="the tasks after the partition", watch=[a])
    after = Recording(record_path)
    report("partition", tasks=len(rows), statuses=dict(counts), partition_s=round(resumed - paused, 3),
           a_long_runs={run.how: sum(x.how == run.how for x in on_a_long) for run in on_a_long},
           a_cancel_after_pause_s=sorted(round(run.finish - paused, 3) for run in on_a_long if run.finish),
           b_rerun_after_pause_s=sorted(round(runs[-1].start - paused, 3)
                                        for i in long_ids if len(runs := recording.runs(i)) > 1),
           executions=len(recording.executions), runs_per_task=recording.histogram(),
           duplicates=len(recording.duplicated()), overlapping=len(overlapping),
           ended_but_failed=len(ended_but_failed), b_exit=b_exit, a_alive=a.proc.poll() is None,
           tracebacks=[tracebacks(a), tracebacks(b)])
    assert not ended_but_failed, f"tasks whose handler completed recorded failed: {ended_but_failed[:5]}"
    assert set(counts) == {"completed"}, {i: (r.status, r.error_types) for i, r in rows.items()
                                           if r.status != "completed"}
    assert not overlapping, f"one task ran on both processes at once: {[tuple(map(str, p)) for p in overlapping[:3]]}"
    assert [run.how for run in on_a_long] == ["cancelled"] * 10, \
        f"A cancels the attempts it cannot renew before their lease runs out: {[str(r) for r in on_a_long]}"
    for task_id in long_ids:
        assert rows[task_id].crashes == 1 and rows[task_id].error_types == ["LeaseExpired"], rows[task_id]
    assert a.proc.poll() is None, "the partitioned process is alive"
    assert b_exit == 0
    assert all(run.pid == a.proc.pid and run.ended for i in after_ids for run in after.runs(i)), \
        "after the partition A runs tasks again"
    assert all(after.runs(i) for i in after_ids)
