"""The claim path must not slow down as history grows: with 1,000,000 finished
rows the claim query still reads only the partial index of runnable tasks."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import trio_asyncio

from taskd import sql

HISTORY = 1_000_000


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


async def test_claim_uses_the_runnable_index_with_a_million_finished_rows(aio_loop: object, database_url: str) -> None:
    claim = sql.queries()["task_claim_many"].text

    async def explain() -> Any:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                """INSERT INTO taskd.tasks (task_type, status, max_retries, timeout_seconds, attempts,
                                            started_at, attempt_started_at, finished_at, result)
                   SELECT 'echo', 'completed', 3, 30, 1, now(), now(), now(), '{}'
                   FROM generate_series(1, $1::int)""", HISTORY)
            await conn.execute("INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds) "
                               "SELECT 'echo', 3, 30 FROM generate_series(1, 100)")
            await conn.execute("ANALYZE taskd.tasks")
            transaction = conn.transaction()
            await transaction.start()
            try:  # EXPLAIN ANALYZE really claims: roll it back
                return json.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + claim,
                                                      "plan-test", 50, ["echo"], 30.0))
            finally:
                await transaction.rollback()
        finally:
            await conn.close()

    (top,) = await trio_asyncio.aio_as_trio(explain)()
    nodes = _nodes(top["Plan"])
    scans = {(n["Node Type"], n.get("Index Name")) for n in nodes if "Scan" in n["Node Type"]}
    assert ("Index Scan", "tasks_runnable_idx") in scans, scans
    assert not any(n["Node Type"] == "Seq Scan" for n in nodes), scans
    assert top["Plan"]["Actual Rows"] == 50
    # The scan of runnable rows touched only those rows, none of the million finished ones.
    runnable = next(n for n in nodes if n.get("Index Name") == "tasks_runnable_idx")
    assert runnable["Actual Rows"] <= 100


async def test_claim_walks_the_index_even_before_the_table_is_analyzed(aio_loop: object, database_url: str) -> None:
    """A new database with a burst of work and no statistics yet: without the claimer's
    session settings the planner sorts all 20,000 waiting rows on every claim."""
    from taskd.store import CLAIMER_SETTINGS

    claim = sql.queries()["task_claim_many"].text

    async def explain() -> Any:
        setup = await asyncpg.connect(database_url)
        try:
            await setup.execute("INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds) "
                                "SELECT 'echo', 3, 30 FROM generate_series(1, 20000)")
        finally:
            await setup.close()
        conn = await asyncpg.connect(database_url, server_settings=CLAIMER_SETTINGS)
        try:
            transaction = conn.transaction()
            await transaction.start()
            try:
                return json.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + claim,
                                                      "plan-test", 50, ["echo", "sleep"], 30.0))
            finally:
                await transaction.rollback()
        finally:
            await conn.close()

    (top,) = await trio_asyncio.aio_as_trio(explain)()
    nodes = _nodes(top["Plan"])
    kinds = {n["Node Type"] for n in nodes}
    assert "Sort" not in kinds and "Bitmap Heap Scan" not in kinds, kinds
    runnable = next(n for n in nodes if n.get("Index Name") == "tasks_runnable_idx")
    assert runnable["Node Type"] == "Index Scan" and runnable["Actual Rows"] <= 100


async def test_outcomes_are_written_by_primary_key_even_with_stale_statistics(
    aio_loop: object, database_url: str
) -> None:
    """Statistics lag behind a queue (every row changes status within seconds); the
    outcome batch must still look rows up one by one, not join against a scan."""
    from taskd.store import FINISHER_SETTINGS

    finish = sql.queries()["task_finish_many"].text
    ids = list(range(1000, 1400))

    async def explain() -> Any:
        conn = await asyncpg.connect(database_url, server_settings=FINISHER_SETTINGS)
        try:
            await conn.execute("INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds, status, "
                               "locked_by, attempts) SELECT 'echo', 3, 30, 'running', 'p', 1 "
                               "FROM generate_series(1, 20000)")
            transaction = conn.transaction()
            await transaction.start()
            try:
                return json.loads(await conn.fetchval(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + finish, "p", ids, [1] * 400, ["completed"] * 400,
                    ["{}"] * 400, [None] * 400, [0.0] * 400))
            finally:
                await transaction.rollback()
        finally:
            await conn.close()

    (top,) = await trio_asyncio.aio_as_trio(explain)()
    nodes = _nodes(top["Plan"])
    scans = [n for n in nodes if n.get("Relation Name") == "tasks" and "Scan" in n["Node Type"]]
    assert [(n["Node Type"], n.get("Index Name")) for n in scans] == [("Index Scan", "tasks_pkey")], scans
    assert scans[0]["Actual Rows"] == 1 and scans[0]["Actual Loops"] == 400
    assert top["Plan"]["Actual Rows"] == 400
