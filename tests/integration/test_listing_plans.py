"""GET /tasks filters read an index however long the history: the listing's plans over
a table of 60,000 finished tasks (the rare rows a filter asks for among the oldest) under
10,000 waiting ones (the newest ids) touch a few pages, never the whole table nor, for a
finished status, the waiting backlog (EXPLAIN ANALYZE, as the pool plans them)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
import trio_asyncio

from taskd import sql
from taskd.store import Store

from .plans import nodes

HISTORY = """
INSERT INTO taskd.tasks (task_type, queue, status, max_retries, timeout_seconds, attempts, created_at, finished_at)
SELECT CASE WHEN i <= 10 THEN 'rare' ELSE 'common' END,
       CASE WHEN i <= 10 THEN 'rareq' ELSE 'default' END,
       CASE WHEN i <= 10 THEN 'failed' ELSE 'completed' END, 0, 30, 1, now(), now()
FROM generate_series(1, 60000) i;
INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds) VALUES ('waiting', 0, 30);
INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds) SELECT 'common', 0, 30 FROM generate_series(1, 10000);
ANALYZE taskd.tasks;
"""

# (status, task_type, cursor, limit, queue), what it is, rows expected, most pages it may touch. A walk
# of the primary key from the newest crosses the 10,000 waiting rows (about 300 pages, fetching their
# rows), then the history (1,000 more).
CASES: list[tuple[tuple[Any, ...], str, int, int]] = [
    (("failed", None, None, 50, None), "the 10 failed, oldest of all", 10, 60),
    (("completed", None, None, 50, None), "the newest completed, under the waiting backlog", 50, 60),
    (("completed", None, 30000, 50, None), "a page deep in the history", 50, 60),
    (("pending", None, None, 50, None), "the newest waiting", 50, 60),
    ((None, None, None, 50, None), "the newest 50", 50, 60),
    # A type or queue filter also walks the waiting backlog (not the history) for unfinished matches.
    ((None, "rare", None, 50, None), "the 10 of a rare type", 10, 400),
    ((None, None, None, 50, "rareq"), "the 10 of a rare queue", 10, 400),
    (("failed", "rare", None, 50, "rareq"), "all three filters", 10, 60),
]


async def _explain(url: str, query: str, args: tuple[Any, ...]) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        conn = await asyncpg.connect(url, server_settings={"plan_cache_mode": "force_custom_plan"})
        try:
            await conn.execute("VACUUM taskd.tasks")  # an index-only visibility map, as a table in use has
            row = await conn.fetchrow("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query, *args)
            plan: dict[str, Any] = json.loads(row[0])[0]["Plan"]
            return plan
        finally:
            await conn.close()
    return await trio_asyncio.aio_as_trio(run)()


@pytest.mark.parametrize("name", ["task_list", "task_list_sizes"])
async def test_every_filter_reads_an_index_not_the_history(store: Store, database_url: str, name: str) -> None:
    async def fill() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(HISTORY)
        finally:
            await conn.close()
    await trio_asyncio.aio_as_trio(fill)()
    query = sql.queries()[name].text
    for args, what, rows, most in CASES:
        plan = await _explain(database_url, query, args)
        walked = nodes(plan)
        touched = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
        assert not [n for n in walked if n["Node Type"] == "Seq Scan"], (what, walked)
        assert touched <= most, (what, touched, [(n["Node Type"], n.get("Index Name")) for n in walked])
        assert plan["Actual Rows"] == rows, what
