"""The bench's scenarios for a queue that has run for years.

    stats   --stats-rows finished tasks (default 10,000,000) and a tenth as many waiting
            (1,000,000), then GET /stats, /stats/detailed and /queues, 200 times each, one
            at a time: p50 and p99 of each, with what they say checked against the table.
    mixed   a server serving only the `emails` queue drains -n tasks of it, once on a table
            where nothing else waits and once beside --backlog-rows (default 1,000,000)
            tasks waiting in another queue: tasks per second of each, interleaved over
            --rounds rounds (default 5), their medians and ratio.

Both need servers the bench starts itself. Imports the scenarios' shared parts.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import asyncpg
import httpx

from loadtest import servers
from loadtest.report import progress, rounded
from loadtest.scenarios import Bench, Finished, Skip

FINISHED_SQL = """INSERT INTO taskd.tasks (task_type, queue, payload, status, result, attempts, max_retries,
                                           timeout_seconds, created_at, started_at, attempt_started_at,
                                           finished_at)
                  SELECT CASE WHEN g % 10 = 0 THEN 'resize' ELSE 'echo' END,
                         CASE WHEN g % 10 = 0 THEN 'media' ELSE 'default' END,
                         '{}'::jsonb, CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END, '{}'::jsonb,
                         1, 3, 300, t, t, t, t
                  FROM (SELECT g, now() - make_interval(secs => g / 100.0) AS t
                        FROM generate_series(1, $1::int) AS g) AS s"""
WAITING_SQL = """INSERT INTO taskd.tasks (task_type, queue, payload, max_retries, timeout_seconds)
                 SELECT 'echo', $2::text, '{}'::jsonb, 3, 300 FROM generate_series(1, $1::int)"""
QUEUED_SQL = """WITH queued AS (
                    INSERT INTO taskd.tasks (task_type, queue, payload, max_retries, timeout_seconds)
                    SELECT 'echo', 'emails', '{}'::jsonb, 3, 300 FROM generate_series(1, $1::int)
                    RETURNING id)
                SELECT min(id), max(id) FROM queued"""
READS = ("/stats", "/stats/detailed", "/queues")
CHUNK = 1_000_000  # rows per INSERT, so that no statement holds hundreds of MB of transition rows


async def _fill(conn: asyncpg.Connection, sql: str, rows: int, *args: Any) -> None:
    done = 0
    while done < rows:
        step = min(CHUNK, rows - done)
        await conn.execute(sql, step, *args)
        done += step
        progress(f"  {done:,} of {rows:,}")


async def stats(bench: Bench) -> dict[str, Any]:
    if bench.url is not None:
        raise Skip("needs a server the bench starts itself (it writes millions of rows)")
    finished, waiting = bench.stats_rows, bench.stats_rows // 10
    figures: dict[str, Any] = {"finished_rows": finished, "waiting_rows": waiting}
    await servers.recreate_database(bench.database_url)
    await servers.migrate(bench.database_url, bench.logs, bench.ports, bench.source)
    conn = await asyncpg.connect(bench.database_url)
    try:
        progress(f"  inserting {finished:,} finished rows")
        started = time.monotonic()
        await _fill(conn, FINISHED_SQL, finished)
        progress(f"  inserting {waiting:,} waiting rows")
        await _fill(conn, WAITING_SQL, waiting, "default")
        figures["fill_s"] = rounded(time.monotonic() - started, 1)
        await conn.execute("VACUUM ANALYZE taskd.tasks")
        truth = {row["status"]: row["n"] for row in await conn.fetch(
            "SELECT status, count(*) AS n FROM taskd.tasks GROUP BY 1")}
        # No workers: the waiting tasks stay waiting while the reads are timed.
        async with servers.taskd(bench.database_url, bench.logs, workers=0, ports=bench.ports,
                                 source=bench.source) as server, httpx.AsyncClient(base_url=server.url,
                                                                                   timeout=60) as client:
            counts = (await client.get("/stats")).json()["counts"]
            figures["counts_match_table"] = all(counts.get(s, 0) == n for s, n in truth.items())
            for path in READS:
                times = []
                for _ in range(bench.reads):
                    t0 = time.perf_counter()
                    response = await client.get(path)
                    times.append((time.perf_counter() - t0) * 1000)
                    response.raise_for_status()
                times.sort()
                figures[path] = {"p50_ms": rounded(times[len(times) // 2], 2),
                                 "p99_ms": rounded(times[int(len(times) * 0.99) - 1], 2),
                                 "max_ms": rounded(times[-1], 2)}
                progress(f"  {path}: p50 {figures[path]['p50_ms']} ms, p99 {figures[path]['p99_ms']} ms")
        figures["server_rss_peak_mb"] = server.rss_peak_mb
        figures["server_log_problems"] = server.log_problems()
    finally:
        await conn.close()
        await servers.drop_database(bench.database_url)
    return figures


async def _drain_emails(bench: Bench, url: str) -> float:
    """Queue -n emails tasks and drain them with a server serving only that queue."""
    conn = await asyncpg.connect(url)
    try:
        lo, hi = await conn.fetchrow(QUEUED_SQL, bench.n)
        await conn.execute("ANALYZE taskd.tasks")
        async with servers.taskd(url, bench.logs, extra=["--queues", "emails=50"], ports=bench.ports,
                                 source=bench.source) as server:
            async with Finished(dataclasses.replace(bench, database_url=url), server.url) as finished:
                ids = range(lo, hi + 1)
                await finished.wait(ids, "mixed")
        first, last = await conn.fetchrow(
            "SELECT min(started_at), max(finished_at) FROM taskd.tasks WHERE id BETWEEN $1 AND $2", lo, hi)
    finally:
        await conn.close()
    return bench.n / (last - first).total_seconds()


async def mixed(bench: Bench) -> dict[str, Any]:
    if bench.url is not None:
        raise Skip("needs servers the bench starts itself")
    empty_url = servers.with_database(bench.database_url, servers.database_name(bench.database_url) + "_empty")
    backlog_url = servers.with_database(bench.database_url, servers.database_name(bench.database_url) + "_backlog")
    for url in (empty_url, backlog_url):
        await servers.recreate_database(url)
        await servers.migrate(url, bench.logs, bench.ports, bench.source)
    conn = await asyncpg.connect(backlog_url)
    try:
        progress(f"  {bench.backlog_rows:,} tasks waiting in queue media")
        await _fill(conn, WAITING_SQL, bench.backlog_rows, "media")
        await conn.execute("VACUUM ANALYZE taskd.tasks")
    finally:
        await conn.close()
    rates: dict[str, list[float]] = {"empty": [], "backlog": []}
    try:
        for round_ in range(1, bench.rounds + 1):
            for side, url in (("empty", empty_url), ("backlog", backlog_url)):
                progress(f"  round {round_}/{bench.rounds}: {side}")
                rates[side].append(await _drain_emails(bench, url))
        conn = await asyncpg.connect(backlog_url)
        try:
            still = await conn.fetchval("SELECT count(*) FROM taskd.tasks WHERE queue = 'media' AND status = 'pending'")
        finally:
            await conn.close()
    finally:
        for url in (empty_url, backlog_url):
            await servers.drop_database(url)
    empty, backlog = statistics.median(rates["empty"]), statistics.median(rates["backlog"])
    return {
        "tasks": bench.n, "backlog_rows": bench.backlog_rows, "rounds": bench.rounds,
        "empty_tasks_per_s": [rounded(r) for r in rates["empty"]],
        "backlog_tasks_per_s": [rounded(r) for r in rates["backlog"]],
        "median_empty_tasks_per_s": rounded(empty), "median_backlog_tasks_per_s": rounded(backlog),
        "backlog_vs_empty": rounded((backlog - empty) / empty, 4),
        "backlog_untouched": still == bench.backlog_rows,
    }


def table_rows(key: str, fig: dict[str, Any]) -> list[tuple[str, str, Any, Any, Any]]:
    if key == "stats":
        return [(key, f"GET {path} ms ({fig['finished_rows']:,} finished, {fig['waiting_rows']:,} waiting)",
                 fig[path]["p99_ms"], fig[path]["p99_ms"], fig[path]["p50_ms"]) for path in READS]
    return [(key, f"emails drain tasks/s, empty table ({fig['rounds']} rounds, median)",
             fig["median_empty_tasks_per_s"], None, None),
            (key, f"... beside {fig['backlog_rows']:,} waiting in another queue", fig["median_backlog_tasks_per_s"],
             None, None),
            (key, "backlog vs empty", f"{fig['backlog_vs_empty']:+.1%}", None, None)]
