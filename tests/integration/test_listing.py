"""GET /tasks against real PostgreSQL: summaries never read the large columns, and a
full page is cut at about 8 MB (issue 6, bounded memory per request)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import trio_asyncio

from taskd import builtin_tasks, sql  # noqa: F401  (builtin_tasks registers the built-in types)
from taskd.config import Settings
from taskd.http import create_app
from taskd.models import TaskStatus, WorkerGauge
from taskd.registry import default_registry
from taskd.schemas import FULL_PAGE_BYTES
from taskd.store import Store

MB = 1024 * 1024
# n rows whose payload is `size` bytes of JSON text; compressible, so quick to write.
PADDED_SQL = """INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds, payload)
                SELECT 'big', 0, 30, jsonb_build_object('pad', repeat('x', $2::int - 11))
                FROM generate_series(1, $1::int) RETURNING id"""
# n rows of 1 MB payloads that pglz cannot compress, so each is ~500 TOAST pages.
RANDOM_SQL = """INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds, payload)
                SELECT 'big', 0, 30, jsonb_build_object('pad', (
                    SELECT string_agg(md5(random()::text || k || g), '') FROM generate_series(1, 32768) k))
                FROM generate_series(1, $1::int) g"""


async def execute(url: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(statement, *args)
        finally:
            await conn.close()

    return await trio_asyncio.aio_as_trio(run)()


async def padded(url: str, count: int, size: int) -> list[int]:
    return [row["id"] for row in await execute(url, PADDED_SQL, count, size)]


async def buffers_touched(url: str, query: str, *args: Any) -> int:
    """Shared buffers an EXPLAIN ANALYZE of query hit or read (TOAST pages included)."""
    (row,) = await execute(url, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query, *args)
    plan = json.loads(row[0])[0]["Plan"]
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]


def client_for(store: Store) -> Any:
    app = create_app(store, default_registry, Settings(), WorkerGauge(0))
    return app.test_client()


async def test_summaries_leave_payload_result_and_errors_unread(store: Store, database_url: str) -> None:
    await execute(database_url, RANDOM_SQL, 10)
    await execute(database_url, """UPDATE taskd.tasks SET status = 'failed', finished_at = now(),
                                   errors = '[{"type": "Old"}]',
                                   last_error = jsonb_build_object('type', 'Boom', 'message', repeat('m', 5000))
                                   WHERE id = 1""")
    (summary, *_), (one,) = (await store.list_summaries(status=None, task_type=None, before_id=None, limit=100),
                             await store.list_summaries(status="failed", task_type=None, before_id=None, limit=1))
    assert (summary.id, summary.crashes, summary.has_error) == (10, 0, False)
    assert one.status == TaskStatus.FAILED and one.error_type == "Boom" and one.error_message == "m" * 500
    page = await (await client_for(store).get("/tasks?status=failed")).get_json()
    assert page["items"][0]["last_error"] == {"type": "Boom", "message": "m" * 500}
    assert "payload" not in page["items"][0] and "errors" not in page["items"][0]
    # The guard: the summary query stays on the heap and index pages, while a query
    # that reads the payloads touches their 10 MB of TOAST (measured the same way).
    args = (None, None, None, 100, None)
    assert await buffers_touched(database_url, sql.queries()["task_list"].text, *args) < 50
    assert await buffers_touched(database_url, sql.queries()["task_list_sizes"].text, *args) > 1000


async def test_a_full_page_is_cut_at_about_8_mb_and_cursors_return_every_row_once(
    store: Store, database_url: str
) -> None:
    ids = await padded(database_url, 30, MB)
    client = client_for(store)
    seen: list[int] = []
    cursor = ""
    pages = 0
    while True:
        response = await client.get(f"/tasks?full=true&limit=1000{cursor}")
        assert response.status_code == 200
        body = await response.get_data()
        page = json.loads(body)
        pages += 1
        seen += [t["id"] for t in page["items"]]
        assert all(len(t["payload"]["pad"]) == MB - 11 and t["crashes"] == 0 for t in page["items"])
        if page["next_cursor"] is None:
            break
        assert FULL_PAGE_BYTES - MB < len(body) <= FULL_PAGE_BYTES, "cut at about 8 MB, never over"
        assert page["next_cursor"] == str(page["items"][-1]["id"])
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == sorted(ids, reverse=True), "every row exactly once, newest first"
    assert pages == 5, "seven rows of a little over 1 MB fit in 8 MB; eight do not"


async def test_a_row_larger_than_the_bound_comes_back_alone(store: Store, database_url: str) -> None:
    (old,) = await padded(database_url, 1, 1000)
    (huge,) = await padded(database_url, 1, FULL_PAGE_BYTES + MB)
    (new,) = await padded(database_url, 1, 1000)
    first = await store.list_tasks(status=None, task_type=None, before_id=None, limit=10, max_bytes=FULL_PAGE_BYTES)
    assert [t.id for t in first] == [new] and first.next_before_id == new
    second = await store.list_tasks(status=None, task_type=None, before_id=new, limit=10, max_bytes=FULL_PAGE_BYTES)
    assert [t.id for t in second] == [huge] and second.next_before_id == huge
    assert len(second.tasks[0].payload_json) > FULL_PAGE_BYTES
    response = await client_for(store).get(f"/tasks?full=true&cursor={new}")
    page = json.loads(await response.get_data())
    assert [t["id"] for t in page["items"]] == [huge] and page["next_cursor"] == str(huge)
    last = await store.list_tasks(status=None, task_type=None, before_id=huge, limit=10, max_bytes=FULL_PAGE_BYTES)
    assert [t.id for t in last] == [old] and last.next_before_id is None


async def test_get_passes_json_text_through(store: Store, database_url: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    (row,) = await execute(database_url, """INSERT INTO taskd.tasks (task_type, max_retries, timeout_seconds,
                                            payload, status, result) VALUES ('other', 0, 30, $1::jsonb,
                                            'completed', $1::jsonb) RETURNING id""", deep)
    task = await store.get(row["id"])
    assert task is not None and task.payload_json == deep and task.errors_json == "[]" and task.crashes == 0
    client = client_for(store)
    for path, key in ((f"/tasks/{row['id']}", "payload"), (f"/tasks/{row['id']}/result", "result")):
        response = await client.get(path)
        assert response.status_code == 200 and f'"{key}":{deep}'.encode() in await response.get_data()
