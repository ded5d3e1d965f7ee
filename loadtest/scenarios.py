"""The bench's scenarios. Each sets up what it needs, measures, and returns its figures.

    bare      reference: the web stack alone (loadtest.bare_app), same client and load as submit
    submit    one task per POST /tasks over C connections: submit rate, then end-to-end rate
    batch     POST /tasks/batch of 500: tasks submitted per second, and completed per second
    drain     N echo tasks queued in the database before the server starts: how fast it empties
    latency   a steady R tasks/s for D s: queue wait and turnaround from the rows' timestamps,
              and HTTP submit latency
    history   drain again, with 1,000,000 finished rows in the table (vs. drain: the claim path
              must not slow down with history)
    pgqueuer  reference: PgQueuer enqueueing N jobs in batches of 500, then draining them with
              batch size 50, in this process
    memory    1,000,000 tasks (--memory-tasks) through one server in batches of 1,000: its RSS
              once 100,000 have completed, its peak after that, and at the end (flat = no leak)
    priority, scheduled: in loadtest.ordering (start order and start time)
    submit with --http-workers 1,2,...: the submit scenario once per process count

Against a server the bench starts, every scenario gets a freshly created database. Only
`pgqueuer` imports anything beyond the client and asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import pathlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from loadtest import rawhttp, servers
from loadtest.rawhttp import LoadResult
from loadtest.report import latency_ms, progress, rounded

ECHO = b'{"task_type":"echo","payload":{}}'
BATCH_SIZE = 500
BATCH_CONNECTIONS = 4  # enough to overlap one batch's JSON parsing with another's INSERT
WARMUP = 100  # requests before a closed-loop measurement: the first ones pay for imports and caches
POLL_INTERVAL = 0.1
FINISH_TIMEOUT = 900.0
UNFINISHED_SQL = """SELECT count(*) FROM taskd.tasks
                    WHERE id BETWEEN $1 AND $2 AND status IN ('pending', 'running', 'retrying')"""


class Skip(Exception):
    """The scenario cannot run in this set-up; the message says why."""


@dataclasses.dataclass
class Bench:
    n: int
    c: int
    duration: float
    history_rows: int
    database_url: str
    logs: pathlib.Path
    url: str | None = None  # a running server to measure instead of starting our own
    live_sql: bool = False  # database_url is that running server's database
    ports: range | None = None  # where our servers may listen (None: any free port)
    memory_tasks: int = 1_000_000
    scheduled_tasks: int = 200
    stats_rows: int = 10_000_000
    reads: int = 200
    backlog_rows: int = 1_000_000
    rounds: int = 5
    source: pathlib.Path | None = None  # run taskd from this source tree (loadtest.compare)

    @property
    def sql(self) -> bool:
        """Can we read taskd's rows? Yes for our own servers, or when told the live one's database."""
        return self.url is None or self.live_sql


@contextlib.asynccontextmanager
async def taskd_under_test(bench: Bench, figures: dict[str, Any], extra: Sequence[str] = ()) -> AsyncIterator[str]:
    """The URL of the server to measure: the --url one, or our own on a fresh database."""
    if bench.url is not None:
        yield bench.url
        return
    await servers.recreate_database(bench.database_url)
    async with servers.taskd(bench.database_url, bench.logs, ports=bench.ports, extra=extra,
                             source=bench.source) as server:
        yield server.url
    figures["server_rss_peak_mb"] = server.rss_peak_mb
    figures["server_log_problems"] = server.log_problems()


class Finished:
    """Tells when tasks have finished: by SQL when we can read the rows, else by GET /stats."""

    def __init__(self, bench: Bench, url: str) -> None:
        self.bench = bench
        self.url = url
        self.conn: asyncpg.Connection | None = None
        self.baseline = 0

    async def __aenter__(self) -> Finished:
        if self.bench.sql:
            self.conn = await asyncpg.connect(self.bench.database_url)
        else:
            self.baseline = await self._stats_finished()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def _stats_finished(self) -> int:
        status, body = await rawhttp.get_json_status(self.url, "/stats")
        if status != 200:
            raise RuntimeError(f"GET /stats answered {status}: {body[:200]!r}")
        counts = json.loads(body)["counts"]
        return int(counts["completed"]) + int(counts["failed"])

    async def wait(self, ids: Sequence[int], label: str) -> float:
        """perf_counter() when all `ids` were seen finished (polled every POLL_INTERVAL)."""
        if not ids:
            return time.perf_counter()
        lo, hi, last_report = min(ids), max(ids), time.monotonic()
        deadline = time.monotonic() + FINISH_TIMEOUT
        while True:
            if self.conn is not None:
                left = int(await self.conn.fetchval(UNFINISHED_SQL, lo, hi))
            else:
                left = len(ids) - (await self._stats_finished() - self.baseline)
            now = time.perf_counter()
            if left <= 0:
                return now
            if time.monotonic() - last_report >= 2:
                progress(f"  {label}: {left} of {len(ids)} not finished yet")
                last_report = time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: {left} tasks still unfinished after {FINISH_TIMEOUT:g}s")
            await asyncio.sleep(POLL_INTERVAL)

    async def outcome(self, ids: Sequence[int]) -> dict[str, int] | None:
        """How many of ids completed and failed (None without SQL access)."""
        if self.conn is None or not ids:
            return None
        row = await self.conn.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
                      count(*) FILTER (WHERE status = 'failed') AS failed
               FROM taskd.tasks WHERE id = ANY($1::bigint[])""", list(ids))
        return dict(row)


def _http(result: LoadResult) -> dict[str, Any]:
    return {
        "latency_ms": latency_ms(result.latencies),
        "requests": len(result.bodies),
        "ok": result.ok,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "errors": result.errors[:5],
        "client_cpu_pct": result.client_cpu_pct,
    }


def _ids(result: LoadResult) -> list[int]:
    ids: list[int] = []
    for body in result.bodies:
        if body is None:
            continue
        data = json.loads(body)
        if "ids" in data:
            ids.extend(data["ids"])
        elif "id" in data:
            ids.append(data["id"])
    return ids


def _echo(_: int) -> rawhttp.Request:
    return "POST", "/tasks", ECHO


# -- the scenarios ---------------------------------------------------------------------------------


async def bare(bench: Bench) -> dict[str, Any]:
    figures: dict[str, Any] = {"note": "reference: loadtest.bare_app, always started locally"}
    async with servers.bare(bench.logs, bench.ports) as server:
        await rawhttp.closed_loop(server.url, WARMUP, bench.c, _echo)
        progress(f"  {bench.n} POSTs over {bench.c} connections to {server.url}")
        result = await rawhttp.closed_loop(server.url, bench.n, bench.c, _echo)
    figures.update(req_per_s=rounded(result.ok / result.elapsed), elapsed_s=rounded(result.elapsed, 3),
                   **_http(result), server_rss_peak_mb=server.rss_peak_mb)
    return figures


async def submit(bench: Bench, http_workers: int = 1) -> dict[str, Any]:
    figures: dict[str, Any] = {"http_workers": http_workers}
    extra = ("--http-workers", str(http_workers)) if http_workers > 1 else ()
    async with taskd_under_test(bench, figures, extra) as url, Finished(bench, url) as finished:
        warmup = await rawhttp.closed_loop(url, WARMUP, bench.c, _echo)
        await finished.wait(_ids(warmup), "warm-up")
        finished.baseline += len(_ids(warmup))  # for /stats counting against a --url server
        progress(f"  {bench.n} POST /tasks over {bench.c} connections to {url}")
        start = time.perf_counter()
        result = await rawhttp.closed_loop(url, bench.n, bench.c, _echo)
        ids = _ids(result)
        progress(f"  submitted {len(ids)} in {result.elapsed:.2f}s; waiting for them to finish")
        done = await finished.wait(ids, "submit")
        figures["outcome"] = await finished.outcome(ids)
    figures.update(req_per_s=rounded(result.ok / result.elapsed), **_http(result),
                   e2e_tasks_per_s=rounded(len(ids) / (done - start)), e2e_elapsed_s=rounded(done - start, 3))
    return figures


async def batch(bench: Bench) -> dict[str, Any]:
    figures: dict[str, Any] = {"batch_size": BATCH_SIZE}
    batches = math.ceil(bench.n / BATCH_SIZE)

    def make(i: int) -> rawhttp.Request:
        size = min(BATCH_SIZE, bench.n - i * BATCH_SIZE)
        return "POST", "/tasks/batch", b'{"tasks":[' + b",".join([ECHO] * size) + b"]}"

    async with taskd_under_test(bench, figures) as url, Finished(bench, url) as finished:
        progress(f"  {bench.n} tasks in {batches} batches over {BATCH_CONNECTIONS} connections to {url}")
        start = time.perf_counter()
        result = await rawhttp.closed_loop(url, batches, BATCH_CONNECTIONS, make)
        ids = _ids(result)
        done = await finished.wait(ids, "batch")
        figures["outcome"] = await finished.outcome(ids)
    figures.update(submitted_per_s=rounded(len(ids) / result.elapsed),
                   submit_elapsed_s=rounded(result.elapsed, 3),
                   completed_per_s=rounded(len(ids) / (done - start)),
                   e2e_elapsed_s=rounded(done - start, 3), **_http(result))
    return figures


async def drain(bench: Bench) -> dict[str, Any]:
    return await _drain(bench, history_rows=0)


async def history(bench: Bench) -> dict[str, Any]:
    if bench.url is not None:
        raise Skip("needs a server the bench starts itself (it writes a million rows)")
    return await _drain(bench, history_rows=bench.history_rows)


async def _drain(bench: Bench, history_rows: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"tasks": bench.n, "history_rows": history_rows}
    if not bench.sql:
        raise Skip("against --url it needs --database-url of that server's database")
    if bench.url is None:
        await servers.recreate_database(bench.database_url)
        await servers.migrate(bench.database_url, bench.logs, bench.ports, bench.source)
    conn = await asyncpg.connect(bench.database_url)
    try:
        if history_rows:
            progress(f"  inserting {history_rows:,} finished rows")
            await conn.execute(HISTORY_SQL, history_rows)
        progress(f"  queueing {bench.n:,} echo tasks straight into the table")
        lo, hi = await conn.fetchrow(PENDING_SQL, bench.n)
        ids = range(lo, hi + 1)
        # Fresh statistics, as a table that has been in use has; both drains get the same treatment.
        await conn.execute("VACUUM ANALYZE taskd.tasks")
        own = (servers.taskd(bench.database_url, bench.logs, ports=bench.ports, source=bench.source)
               if bench.url is None else None)
        async with own or contextlib.nullcontext() as server:
            url = server.url if server is not None else bench.url
            assert url is not None
            progress(f"  draining on {url}")
            async with Finished(bench, url) as finished:
                await finished.wait(ids, "drain")
                figures["outcome"] = await finished.outcome(ids)
        if server is not None:
            figures["server_rss_peak_mb"] = server.rss_peak_mb
            figures["server_log_problems"] = server.log_problems()
        # From the first claim to the last outcome written, by the database's clock: what the
        # server's start-up and our polling cost is left out.
        first, last = await conn.fetchrow(
            "SELECT min(started_at), max(finished_at) FROM taskd.tasks WHERE id BETWEEN $1 AND $2", lo, hi)
    finally:
        await conn.close()
    elapsed = (last - first).total_seconds()
    figures.update(tasks_per_s=rounded(bench.n / elapsed), elapsed_s=rounded(elapsed, 3))
    return figures


PENDING_SQL = """WITH queued AS (
                     INSERT INTO taskd.tasks (task_type, payload, max_retries, timeout_seconds)
                     SELECT 'echo', '{}'::jsonb, 3, 300 FROM generate_series(1, $1::int)
                     RETURNING id)
                 SELECT min(id), max(id) FROM queued"""
# Finished rows spread over the past; one statement, no round trip per row.
HISTORY_SQL = """INSERT INTO taskd.tasks (task_type, payload, status, result, attempts, max_retries,
                                          timeout_seconds, created_at, started_at, finished_at)
                 SELECT 'echo', '{}'::jsonb, 'completed', '{}'::jsonb, 1, 3, 300, t, t, t
                 FROM (SELECT now() - make_interval(secs => g) AS t
                       FROM generate_series(1, $1::int) AS g) AS s"""


async def latency(bench: Bench, rate: float) -> dict[str, Any]:
    figures: dict[str, Any] = {"rate": rate, "duration_s": bench.duration}
    async with taskd_under_test(bench, figures) as url, Finished(bench, url) as finished:
        progress(f"  {rate:g} tasks/s for {bench.duration:g}s to {url}")
        result = await rawhttp.paced(url, rate, bench.duration, bench.c, _echo)
        ids = _ids(result)
        await finished.wait(ids, "latency")
        figures["outcome"] = await finished.outcome(ids)
        rows = await finished.conn.fetch(TIMES_SQL, ids) if finished.conn is not None and ids else []
    figures.update(achieved_per_s=rounded(result.ok / result.elapsed), **_http(result))
    if rows:
        figures["submit_to_start_ms"] = latency_ms([r["wait"] for r in rows])
        figures["submit_to_done_ms"] = latency_ms([r["turnaround"] for r in rows])
    return figures


TIMES_SQL = """SELECT extract(epoch FROM started_at - created_at)::float8 AS wait,
                      extract(epoch FROM finished_at - created_at)::float8 AS turnaround
               FROM taskd.tasks WHERE id = ANY($1::bigint[]) AND finished_at IS NOT NULL"""


async def pgqueuer(bench: Bench) -> dict[str, Any]:
    try:
        from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
        from pgqueuer.types import QueueExecutionMode
    except ImportError:
        raise Skip("pgqueuer is not installed (pip install pgqueuer)") from None
    # Its own database, so a --database-url of a live taskd is never touched.
    name = servers.database_name(bench.database_url)[:50] + "_pgqueuer"
    url = servers.with_database(bench.database_url, name)
    await servers.recreate_database(url)
    figures: dict[str, Any] = {"jobs": bench.n, "enqueue_batch": BATCH_SIZE, "dequeue_batch": 50}
    producer = await asyncpg.connect(url)
    consumer = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(producer))
        await queries.install()
        progress(f"  enqueueing {bench.n} jobs in batches of {BATCH_SIZE}")
        start = time.perf_counter()
        for offset in range(0, bench.n, BATCH_SIZE):
            size = min(BATCH_SIZE, bench.n - offset)
            await queries.enqueue(["echo"] * size, [None] * size, [0] * size)
        enqueue_elapsed = time.perf_counter() - start

        manager = QueueManager(Queries(AsyncpgDriver(consumer)))
        seen = {"first": 0.0, "count": 0}

        @manager.entrypoint("echo")
        async def echo(job: Job) -> None:
            if not seen["count"]:
                seen["first"] = time.perf_counter()
            seen["count"] += 1

        progress("  draining them with batch size 50")
        # drain mode returns once the queue is empty and the last statuses are written
        await manager.run(batch_size=50, mode=QueueExecutionMode.drain)
        drain_elapsed = time.perf_counter() - seen["first"]
    finally:
        await producer.close()
        await consumer.close()
        await servers.drop_database(url)
    figures.update(enqueue_per_s=rounded(bench.n / enqueue_elapsed),
                   enqueue_elapsed_s=rounded(enqueue_elapsed, 3),
                   drain_per_s=rounded(seen["count"] / drain_elapsed),
                   drain_elapsed_s=rounded(drain_elapsed, 3),
                   processed=seen["count"], note="in the bench's process, plain asyncio loop")
    return figures


MEMORY_BATCH = 1000


async def memory(bench: Bench) -> dict[str, Any]:
    if bench.url is not None:
        raise Skip("needs a server the bench starts itself (it reads that process's memory)")
    total = bench.memory_tasks
    figures: dict[str, Any] = {"tasks": total}
    await servers.recreate_database(bench.database_url)
    async with servers.taskd(bench.database_url, bench.logs, ports=bench.ports, source=bench.source) as server:
        conn = await asyncpg.connect(bench.database_url)
        try:
            def make(i: int) -> rawhttp.Request:
                size = min(MEMORY_BATCH, total - i * MEMORY_BATCH)
                return "POST", "/tasks/batch", b'{"tasks":[' + b",".join([ECHO] * size) + b"]}"

            # Submitting runs beside a watcher that notes the RSS once 100,000 have completed.
            samples: dict[str, int] = {}
            start = time.perf_counter()
            submitter = asyncio.create_task(
                rawhttp.closed_loop(server.url, math.ceil(total / MEMORY_BATCH), 2, make))
            last_report = 0.0
            while True:
                done = int(await conn.fetchval(DONE_SQL))
                if done >= min(100_000, total) and "rss_at_100k" not in samples:
                    samples["rss_at_100k"] = server.rss_now
                    server.rss_peak = server.rss_now  # the peak from here on
                if done >= total:
                    break
                if time.perf_counter() - last_report > 5:
                    progress(f"  {done:,} of {total:,} completed, RSS {server.rss_now / 2**20:.0f} MB")
                    last_report = time.perf_counter()
                await asyncio.sleep(0.5)
            result = await submitter
            elapsed = time.perf_counter() - start
            samples["rss_end"] = server.rss_now
        finally:
            await conn.close()
    mb = {key: round(value / 2**20, 1) for key, value in samples.items()}
    figures.update(elapsed_s=rounded(elapsed, 1), tasks_per_s=rounded(total / elapsed),
                   rss_at_100k_mb=mb.get("rss_at_100k"), rss_peak_after_100k_mb=server.rss_peak_mb,
                   rss_end_mb=mb.get("rss_end"), submit_errors=result.errors[:3])
    return figures


DONE_SQL = "SELECT count(*) FROM taskd.tasks WHERE status = 'completed'"
