"""The kept counts behind /stats, /stats/detailed and GET /queues, on real PostgreSQL:
equal to a full count of the table after any mix of operations (a property test), before
and after folding; corrected by the hourly check when something bypassed the triggers;
the timeline and latency histograms; and plans that never read the task table's history."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskd.models import NewTask, Outcome, TaskStatus
from taskd.store import Store
from tests.conftest import scratch_database

from .plans import nodes
from .test_store import raw

QUEUES = ("default", "emails")
TYPES = ("echo", "resize")

TRUE_COUNTS = """
SELECT CASE WHEN status = 'pending' AND run_at > now() THEN 'scheduled' ELSE status END AS status,
       queue, task_type, count(*) AS n,
       count(*) FILTER (WHERE status = 'completed' AND attempts > 1) AS completed_after_retry,
       count(*) FILTER (WHERE status IN ('completed', 'failed') AND attempts > 1) AS finished_after_retry
FROM taskd.tasks GROUP BY 1, 2, 3
"""


async def truth(store: Store) -> dict[str, Any]:
    """What the kept counts must say, from a full count of the table."""
    (rows,) = await raw(store.url, TRUE_COUNTS)
    statuses = {s.value: 0 for s in TaskStatus}
    by_type: dict[str, dict[str, int]] = {}
    by_queue: dict[str, dict[str, int]] = {}
    for row in rows:
        statuses[row["status"]] += row["n"]
        t = by_type.setdefault(row["task_type"], {"total": 0, "completed_after_retry": 0, "finished_after_retry": 0})
        t[row["status"]] = t.get(row["status"], 0) + row["n"]
        t["total"] += row["n"]
        t["completed_after_retry"] += row["completed_after_retry"]
        t["finished_after_retry"] += row["finished_after_retry"]
        q = by_queue.setdefault(row["queue"], {})
        q[row["status"]] = q.get(row["status"], 0) + row["n"]
    return {"counts": statuses, "by_type": by_type, "by_queue": by_queue}


async def kept(store: Store) -> dict[str, Any]:
    """What the kept counts say, through the Store's reads."""
    by_type = {}
    for row in await store.by_type():
        by_type[row["task_type"]] = {k: v for k, v in row.items()
                                     if k != "task_type" and (v or k in ("total", "completed_after_retry",
                                                                         "finished_after_retry"))}
    by_queue = {}
    for row in await store.queues():
        counts = {s.value: row[s.value] for s in TaskStatus if row[s.value]}
        if counts:
            by_queue[row["name"]] = counts
    return {"counts": await store.counts(), "by_type": by_type, "by_queue": by_queue}


def normalised(view: dict[str, Any]) -> dict[str, Any]:
    return {
        "counts": view["counts"],
        "by_type": {t: {k: v for k, v in row.items() if v or k in ("total", "completed_after_retry",
                                                                    "finished_after_retry")}
                    for t, row in view["by_type"].items()},
        "by_queue": {q: {k: v for k, v in row.items() if v} for q, row in view["by_queue"].items()},
    }


OPERATIONS = st.lists(st.tuples(
    st.sampled_from(["submit", "schedule", "schedule_soon", "claim", "complete", "fail", "retry_later", "cancel",
                     "retry", "delete", "expire", "rescue", "prune", "fold", "release"]),
    st.integers(0, 1_000_000)), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def counts_databases(server_url: str, template_db: str) -> Iterator[Any]:
    def make() -> Any:
        return scratch_database(server_url, "taskd_counts", template_db)
    yield make


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(OPERATIONS)
def test_the_kept_counts_equal_a_full_count_after_any_mix_of_operations(
        counts_databases: Any, operations: list[tuple[str, int]]) -> None:
    with counts_databases() as url:
        trio.run(_check_operations, url, operations)


async def _check_operations(url: str, operations: list[tuple[str, int]]) -> None:
    async with trio_asyncio.open_loop():
        store = await Store.open(url, pool_size=4, process_id="counts-test")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.inserts.run)
                await nursery.start(store.finishes.run)
                held: list[tuple[int, int]] = []  # (id, attempt) claimed and not finished
                for op, seed in operations:
                    await _apply(store, op, random.Random(seed), held)
                    assert normalised(await kept(store)) == normalised(await truth(store)), (op, operations)
                await store.fold_counts()
                assert normalised(await kept(store)) == normalised(await truth(store)), "after folding"
                store.inserts.close()
                store.finishes.close()
        finally:
            await store.close()


async def _ids(store: Store, where: str) -> list[int]:
    (rows,) = await raw(store.url, f"SELECT id FROM taskd.tasks WHERE {where} ORDER BY id")
    return [row["id"] for row in rows]


async def _apply(store: Store, op: str, rng: random.Random, held: list[tuple[int, int]]) -> None:
    queue, task_type = rng.choice(QUEUES), rng.choice(TYPES)
    if op in ("submit", "schedule", "schedule_soon", "expire"):
        n = rng.randint(1, 5)
        # A later hour's bucket; or this hour's, split at read time (not due before the example
        # ends, so the two reads compared agree; the split's change as tasks fall due has its own test).
        delay = {"schedule": 3600.0 * rng.randint(1, 30), "schedule_soon": rng.uniform(5.0, 60.0)}.get(op)
        await store.submit_many([NewTask(task_type, "{}", rng.randint(0, 2), 30.0, queue=queue,
                                         delay_seconds=delay,
                                         expires_in_seconds=0.001 if op == "expire" else None)
                                 for _ in range(n)])
        if op == "expire":
            await trio.sleep(0.01)
            await store.expire_due()
    elif op == "claim":
        for claimed in await store.claim(rng.randint(1, 6), list(TYPES), 30.0):
            held.append((claimed.id, claimed.attempt))
    elif op in ("complete", "fail", "retry_later") and held:
        task_id, attempt = held.pop(rng.randrange(len(held)))
        status = {"complete": TaskStatus.COMPLETED, "fail": TaskStatus.FAILED,
                  "retry_later": TaskStatus.RETRYING}[op]
        await store._finish_batch([Outcome(task_id, attempt, status, result_json="{}" if op == "complete" else None,
                                           error_json=None if op == "complete" else json.dumps({"type": "E"}),
                                           retry_delay=rng.choice([0.0, 3600.0]))])
    elif op == "cancel":
        ids = await _ids(store, "status IN ('pending', 'retrying', 'running')")
        if ids:
            await store.cancel(rng.choice(ids))
    elif op == "retry":
        ids = await _ids(store, "status IN ('failed', 'cancelled', 'expired')")
        if ids:
            await store.retry(rng.choice(ids))
    elif op == "delete":
        ids = await _ids(store, "true")
        if ids:
            await store.delete(rng.choice(ids))
    elif op == "rescue" and held:
        await raw(store.url, "UPDATE taskd.tasks SET locked_until = now() - interval '1 second' "
                             "WHERE status = 'running'")
        await store.rescue_expired()
        held.clear()
    elif op == "release" and held:
        await store.release(list(held))
        held.clear()
    elif op == "prune":
        await raw(store.url, "DELETE FROM taskd.tasks WHERE id IN (SELECT id FROM taskd.tasks "
                             "WHERE finished_at IS NOT NULL ORDER BY id LIMIT 3)")
    elif op == "fold":
        await store.fold_counts()


async def test_the_first_check_counts_what_was_there_before_the_triggers(store: Store) -> None:
    await raw(store.url, "ALTER TABLE taskd.tasks DISABLE TRIGGER tasks_count_inserted",
              "INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds) "
              "SELECT 'echo', 0, 30 FROM generate_series(1, 7)",
              "ALTER TABLE taskd.tasks ENABLE TRIGGER tasks_count_inserted")
    assert (await store.counts())["pending"] == 0, "as after the migration: the totals start empty"
    assert await store.check_counts(every=3600) == 7, "never checked: due at once"
    assert (await store.counts())["pending"] == 7
    assert await store.check_counts(every=3600) is None, "checked now: not due for an hour"


async def test_the_hourly_check_corrects_counts_that_something_bypassed(store: Store) -> None:
    assert await store.check_counts(every=3600) == 0, "the first check, on an empty table"
    await store.submit_many([NewTask("echo", "{}", 0, 30.0) for _ in range(5)])
    await store.fold_counts()
    # Triggers do not fire for TRUNCATE, nor in a session replaying a replica's changes.
    await raw(store.url, "SET session_replication_role = replica",
              "DELETE FROM taskd.tasks WHERE id IN (SELECT id FROM taskd.tasks ORDER BY id LIMIT 2)")
    assert (await store.counts())["pending"] == 5, "the bypass went unseen, as expected"
    assert await store.check_counts(every=3600) is None, "checked a moment ago: not due yet"
    assert await store.check_counts(every=0) == 2
    assert (await store.counts())["pending"] == 3
    assert await store.check_counts(every=0) == 0, "nothing is off any more"


async def test_finished_tasks_make_the_timeline_rates_and_latency_percentiles(store: Store) -> None:
    ids = [s.id for s in await store.submit_many([NewTask("echo", "{}", 0, 30.0) for _ in range(20)])]
    claimed = await store.claim(20, ["echo"], 30.0)
    # Known run times: attempt i started (i + 1) * 10 ms before it finishes.
    await raw(store.url, *[f"UPDATE taskd.tasks SET attempt_started_at = now() - interval '{(i + 1) * 10} ms' "
                           f"WHERE id = {task_id}" for i, task_id in enumerate(ids)])
    outcomes = [Outcome(c.id, c.attempt, TaskStatus.COMPLETED if c.id != ids[0] else TaskStatus.FAILED,
                        result_json="{}" if c.id != ids[0] else None,
                        error_json=None if c.id != ids[0] else json.dumps({"type": "E"}))
                for c in claimed]
    await store._finish_batch(outcomes)
    for fold in (False, True):  # exact before the fold (deltas) and after (buckets)
        if fold:
            await store.fold_counts()
        recent = await store.recent(60)
        assert recent == {"completed": 19, "failed": 1}
        timeline = await store.timeline()
        assert sum(r["completed"] for r in timeline) == 19 and sum(r["failed"] for r in timeline) == 1
        (timing,) = await store.timings_by_type()
        assert timing["task_type"] == "echo" and timing["n"] == 20
        p50, p95, p99 = timing["run_pct"]
        # The run times are about 10, 20, ..., 200 ms (plus the time the statements took);
        # a percentile is its bucket's upper bound, within 10 % above.
        assert 100 <= p50 <= 100 * 1.1 + 300, timing  # + the time between the statements, on a loaded machine
        assert 190 <= p95 <= 200 * 1.1 + 300 and 190 <= p99 <= 200 * 1.1 + 300, timing
        assert 100 <= timing["run_avg"] <= 400, timing
        assert timing["wait_pct"][0] is not None and timing["wait_avg"] >= 0


async def test_a_due_task_counts_as_pending_at_once_and_a_scheduled_one_as_scheduled(store: Store) -> None:
    # Exactly, even within the current hour's bucket (split at read time).
    await store.submit_many([NewTask("echo", "{}", 0, 30.0), NewTask("echo", "{}", 0, 30.0, delay_seconds=1.5)])
    counts = await store.counts()
    assert (counts["pending"], counts["scheduled"]) == (1, 1)
    await store.fold_counts()
    await trio.sleep(1.6)
    counts = await store.counts()
    assert [(r["pending"], r["scheduled"]) for r in await store.queues()] == [(2, 0)]
    assert [(r["pending"], r["scheduled"]) for r in await store.by_type()] == [(2, 0)]
    assert (counts["pending"], counts["scheduled"]) == (2, 0), "due now: counted pending without any write"
    await store.fold_counts()
    assert (await store.counts())["pending"] == 2
    # Only this hour's bucket may stay apart from the due key: earlier ones are folded into it.
    (rows,) = await raw(store.url, "SELECT count(*) FROM taskd.counts WHERE due > '-infinity' "
                                   "AND due < taskd.count_hour(now())")
    assert rows[0][0] == 0


READS = {
    "stats_counts": (), "stats_recent": (60,), "stats_by_type": (), "stats_timings_by_type": (3600,),
    "stats_timeline": (900,), "queue_list": (None,),
}


async def test_the_reads_never_scan_the_task_table(store: Store) -> None:
    await raw(store.url,
              "INSERT INTO taskd.tasks (task_type, queue, status, max_retries, timeout_seconds, finished_at) "
              "SELECT 'echo', 'q' || (i % 3), CASE WHEN i % 4 = 0 THEN 'pending' ELSE 'completed' END, 0, 30, "
              "CASE WHEN i % 4 = 0 THEN NULL ELSE now() END FROM generate_series(1, 40000) i",
              "ANALYZE taskd.tasks")
    await store.fold_counts()
    for name, args in READS.items():
        query = store._q[name].text
        for i, arg in enumerate(args, start=1):
            query = query.replace(f"${i}::float8", f"{arg}::float8").replace(f"${i}::text", "NULL::text")
        (plan,) = await raw(store.url, "EXPLAIN (FORMAT JSON) " + query)
        walked = nodes(json.loads(plan[0][0])[0]["Plan"])
        on_tasks = [n for n in walked if n.get("Relation Name") == "tasks"]
        # Only probes of the queue-led index: the oldest waiting task of each queue, and the
        # current hour's scheduled tasks of a queue that has any (taskd.scheduled_this_hour()).
        assert all(n.get("Index Name") == "tasks_runnable_idx" for n in on_tasks), (name, on_tasks)
        if name == "queue_list":
            assert on_tasks, name
    queues = {q["name"]: q for q in await store.queues()}
    assert sum(q["pending"] for q in queues.values()) == 10000
    assert all(q["oldest_wait_seconds"] is not None and q["oldest_wait_seconds"] >= 0 for q in queues.values())
