"""The hot statements must keep their plans whatever the table holds: with 1,000,000
finished rows, before any statistics exist, or with statistics that lag behind."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg
import trio_asyncio

from taskd import sql
from taskd.store import CLAIMER_SETTINGS, FINISHER_SETTINGS

from .plans import nodes

HISTORY_SQL = """INSERT INTO taskd.tasks (task_type, status, max_retries, timeout_seconds, attempts,
                                          started_at, attempt_started_at, finished_at, result)
                 SELECT 'echo', 'completed', 3, 30, 1, now(), now(), now(), '{}'
                 FROM generate_series(1, 1000000)"""
PENDING_SQL = """INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds)
                 SELECT 'echo', 3, 30 FROM generate_series(1, $1::int)"""
RUNNING_SQL = """INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds, status, locked_by, attempts)
                 SELECT 'echo', 3, 30, 'running', 'p', 1 FROM generate_series(1, 20000)"""


async def explain(url: str, setup: Sequence[tuple[str, ...]], settings: dict[str, str], query: str,
                  *args: Any) -> dict[str, Any]:
    """Run the setup statements, then EXPLAIN ANALYZE query in a session with these
    settings, rolled back (EXPLAIN ANALYZE really runs it); the plan's top node."""

    async def run() -> Any:
        conn = await asyncpg.connect(url, server_settings=settings)
        try:
            for statement, *params in setup:
                await conn.execute(statement, *params)
            transaction = conn.transaction()
            await transaction.start()
            try:
                return json.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + query, *args))
            finally:
                await transaction.rollback()
        finally:
            await conn.close()

    (top,) = await trio_asyncio.aio_as_trio(run)()
    return top["Plan"]


def runnable_scan(plan: dict[str, Any]) -> dict[str, Any]:
    """The walk of one queue's runnable rows."""
    return next(n for n in nodes(plan)
                if n.get("Index Name") == "tasks_runnable_idx" and n["Node Type"] == "Index Scan")


async def test_claim_uses_the_runnable_index_with_a_million_finished_rows(aio_loop: object, database_url: str) -> None:
    plan = await explain(database_url, [(HISTORY_SQL,), (PENDING_SQL, 100), ("ANALYZE taskd.tasks",)],
                         CLAIMER_SETTINGS, sql.queries()["task_claim_many"].text, "plan-test", 50, ["echo"], 30.0,
                         [], None)
    # (The few rows of taskd.queues, read once per claim for the paused ones, may be scanned.)
    assert not any(n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks" for n in nodes(plan))
    assert plan["Actual Rows"] == 50
    # The scan of runnable rows touched only those rows, none of the million finished ones.
    assert runnable_scan(plan)["Node Type"] == "Index Scan" and runnable_scan(plan)["Actual Rows"] <= 150


async def test_claim_walks_the_index_even_before_the_table_is_analyzed(aio_loop: object, database_url: str) -> None:
    """A new database with a burst of work and no statistics yet: without the claimer's
    session settings the planner sorts all 20,000 waiting rows on every claim."""
    plan = await explain(database_url, [(PENDING_SQL, 20000)], CLAIMER_SETTINGS,
                         sql.queries()["task_claim_many"].text, "plan-test", 50, ["echo", "sleep"], 30.0, [], None)
    kinds = {n["Node Type"] for n in nodes(plan)}
    assert "Bitmap Heap Scan" not in kinds, kinds
    # The only sort is the merge of the queues' best 50, never of all that wait.
    assert all(n["Actual Rows"] <= 50 for n in nodes(plan) if n["Node Type"] == "Sort")
    assert runnable_scan(plan)["Node Type"] == "Index Scan" and runnable_scan(plan)["Actual Rows"] <= 150


async def test_outcomes_are_written_by_primary_key_even_with_stale_statistics(
    aio_loop: object, database_url: str
) -> None:
    """Statistics lag behind a queue (every row changes status within seconds); the
    outcome batch must still look rows up one by one, not join against a scan."""
    ids = list(range(1000, 1400))
    plan = await explain(database_url, [(RUNNING_SQL,)], FINISHER_SETTINGS, sql.queries()["task_finish_many"].text,
                         "p", ids, [1] * 400, ["completed"] * 400, ["{}"] * 400, [None] * 400, [0.0] * 400,
                         [False] * 400, [False] * 400, [None] * 400)
    scans = [n for n in nodes(plan) if n.get("Relation Name") == "tasks" and "Scan" in n["Node Type"]]
    assert [(n["Node Type"], n.get("Index Name")) for n in scans] == [("Index Scan", "tasks_pkey")], scans
    assert scans[0]["Actual Rows"] == 1 and scans[0]["Actual Loops"] == 400
    assert plan["Actual Rows"] == 400


async def test_a_claim_ignores_the_backlog_of_paused_and_other_queues(aio_loop: object, database_url: str) -> None:
    """200,000 waiting in a paused queue and in another queue: a claim (for every queue, or a
    lane's one) and the next-due look-up read only the queues they may take from."""
    backlog = ("INSERT INTO taskd.tasks (task_type, queue, max_retries, timeout_seconds) "
               "SELECT 'echo', CASE WHEN g % 2 = 0 THEN 'paused' ELSE 'other' END, 3, 30 "
               "FROM generate_series(1, 200000) g")
    setup: list[tuple[Any, ...]] = [(backlog,), (PENDING_SQL, 100),
                                    ("INSERT INTO taskd.queues (name, paused) VALUES ('paused', true)",),
             ("ANALYZE taskd.tasks",)]
    claim = sql.queries()["task_claim_many"].text
    for queues in (["default"], None):
        plan = await explain(database_url, setup, CLAIMER_SETTINGS, claim, "plan-test", 50, ["echo"], 30.0, [],
                             queues)
        setup = []  # committed by the first explain
        assert plan["Actual Rows"] == 50
        read = sum(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) for n in nodes(plan)
                   if n.get("Relation Name") == "tasks")
        assert read < 1000, (queues, read)  # not the 100,000 of another queue, nor the paused 100,000
    due = await explain(database_url, setup, CLAIMER_SETTINGS, sql.queries()["task_next_due"].text, ["echo"], [],
                        ["default"])
    read = sum(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) for n in nodes(due)
               if n.get("Relation Name") == "tasks")
    assert read < 500, read



async def test_the_cached_generic_claim_plan_updates_by_primary_key(aio_loop: object, database_url: str) -> None:
    """A prepared claim runs a generic plan after a few calls; on a new database (taskd.queues
    never analyzed) that plan hashed the whole runnable set on every claim unless told not to."""
    settings = {**CLAIMER_SETTINGS, "plan_cache_mode": "force_generic_plan"}
    prepare = ("PREPARE claim(text, int, text[], float8, bigint[], text[]) AS "
               + sql.queries()["task_claim_many"].text)
    plan = await explain(database_url, [(PENDING_SQL, 20000), ("VACUUM ANALYZE taskd.tasks",), (prepare,)], settings,
                         "EXECUTE claim('plan-test', 50, ARRAY['echo'], 30, ARRAY[]::bigint[], NULL)")
    kinds = {n["Node Type"] for n in nodes(plan)}
    assert not kinds & {"Hash Join", "Merge Join", "Hash"}, kinds
    read = sum(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) for n in nodes(plan)
               if n.get("Relation Name") == "tasks")
    assert plan["Actual Rows"] == 50 and read < 500, read


async def test_concurrent_claims_across_queues_never_share_a_task(aio_loop: object, database_url: str) -> None:
    """Claimer A takes the best 3 (queue a) and, for the moment its statement runs, holds queue
    b's candidates too; B, claiming meanwhile, skips them (never waits, never takes A's), and
    gets queue b's once A's claim is done."""
    claim = sql.queries()["task_claim_many"].text

    async def run() -> tuple[list[str], list[str], list[str]]:
        a = await asyncpg.connect(database_url, server_settings=CLAIMER_SETTINGS)
        b = await asyncpg.connect(database_url, server_settings=CLAIMER_SETTINGS)
        try:
            await a.execute("INSERT INTO taskd.tasks (task_type, queue, priority, max_retries, timeout_seconds) "
                            "SELECT 'echo', q, p, 3, 30 FROM (VALUES ('a', 5), ('b', 1)) v(q, p), "
                            "generate_series(1, 3)")
            queue_of = {r["id"]: r["queue"] for r in await b.fetch("SELECT id, queue FROM taskd.tasks")}
            transaction = a.transaction()
            await transaction.start()
            try:
                first = await a.fetch(claim, "a", 3, ["echo"], 30.0, [], None)
                during = await b.fetch(claim, "b", 3, ["echo"], 30.0, [], None)
            finally:
                await transaction.commit()
            after = await b.fetch(claim, "b", 3, ["echo"], 30.0, [], None)
            return ([queue_of[r["id"]] for r in first], [queue_of[r["id"]] for r in during],
                    [queue_of[r["id"]] for r in after])
        finally:
            await a.close()
            await b.close()

    first, during, after = await trio_asyncio.aio_as_trio(run)()
    assert first == ["a"] * 3 and set(during) <= {"b"} and sorted(during + after) == ["b"] * 3
