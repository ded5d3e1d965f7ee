"""GET /tasks filters read an index however long the history: the listing's plans over
a table of 60,000 finished tasks, with the rare rows a filter asks for among the oldest,
touch a few pages, never the whole table (EXPLAIN ANALYZE, as the pool plans them)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
import trio_asyncio

from taskd import sql
from taskd.store import Store

HISTORY = """
INSERT INTO taskd.tasks (task_type, queue, status, max_retries, timeout_seconds, attempts, created_at, finished_at)
SELECT CASE WHEN i <= 10 THEN 'rare' ELSE 'common' END,
       CASE WHEN i <= 10 THEN 'rareq' ELSE 'default' END,
       CASE WHEN i <= 10 THEN 'failed' ELSE 'completed' END, 0, 30, 1, now(), now()
FROM generate_series(1, 60000) i;
INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds) VALUES ('waiting', 0, 30);
ANALYZE taskd.tasks;
"""

# status, task_type, cursor, limit, queue -> the ids expected
CASES: list[tuple[tuple[Any, ...], str]] = [
    (("failed", None, None, 50, None), "the 10 failed, oldest of all"),
    ((None, "rare", None, 50, None), "the 10 of a rare type"),
    ((None, None, None, 50, "rareq"), "the 10 of a rare queue"),
    (("pending", None, None, 50, None), "the one waiting task"),
    ((None, None, None, 50, None), "the newest 50"),
    (("completed", None, 30000, 50, None), "a page deep in the history"),
    (("failed", "rare", None, 50, "rareq"), "all three filters"),
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


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node] + [n for child in node.get("Plans", []) for n in _nodes(child)]


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
    for args, what in CASES:
        plan = await _explain(database_url, query, args)
        nodes = _nodes(plan)
        touched = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
        assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], (what, nodes)
        assert touched < 120, (what, touched, [(n["Node Type"], n.get("Index Name")) for n in nodes])
        assert plan["Actual Rows"] == min(50, {"the newest 50": 50, "a page deep in the history": 50,
                                               "the one waiting task": 1}.get(what, 10)), what
