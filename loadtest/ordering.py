"""The bench's ordering scenarios: does taskd start tasks in the order, and at the time, it promises?

    priority  N echo tasks, each of one of five priorities picked at random (seeded), queued over
              HTTP while no worker runs; then a server with workers drains them. Reports how many
              started out of priority order, and out of submission order within one priority.
    scheduled --scheduled-tasks echo tasks due over the next --duration seconds, half by run_at
              (RFC 3339 with a non-UTC offset), half by delay_seconds, submitted out of due order.
              Reports lateness, started_at - run_at: p99, p50, max, min; none may be negative.

Both read the rows' timestamps, which are the database's clock, so neither depends on how
often the bench polls. Imports the scenarios' shared parts and nothing beyond them.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import json
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from loadtest import rawhttp, servers
from loadtest.report import latency_ms, percentile, progress, rounded
from loadtest.scenarios import BATCH_SIZE, Bench, Finished, Skip, _ids, taskd_under_test

PRIORITY_LEVELS = (-100, -50, 0, 50, 100)
SEED = 20240601  # the same mix every run, so runs compare
SCHEDULE_LEAD = 1.0  # s from submitting to the first due time: submitting is never why a task is late
# Not UTC, so a server that ignored the offset would start these hours early or late.
ZONE = dt.timezone(dt.timedelta(hours=5, minutes=30))
LATENESS_GOAL = 1.0  # s, for p99

STARTS_SQL = """SELECT id, priority, created_at, started_at FROM taskd.tasks
                WHERE id = ANY($1::bigint[]) AND started_at IS NOT NULL"""
LATENESS_SQL = """SELECT extract(epoch FROM started_at - run_at)::float8 AS lateness FROM taskd.tasks
                  WHERE id = ANY($1::bigint[]) AND started_at IS NOT NULL"""


def _batches(items: Sequence[dict[str, Any]]) -> tuple[int, rawhttp.MakeRequest]:
    """How many POST /tasks/batch requests carry `items`, and request number i."""
    def make(i: int) -> rawhttp.Request:
        return "POST", "/tasks/batch", json.dumps({"tasks": items[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]}).encode()

    return math.ceil(len(items) / BATCH_SIZE), make


async def priority(bench: Bench) -> dict[str, Any]:
    if bench.url is not None:
        raise Skip("needs servers the bench starts itself (the backlog is queued while no worker runs)")
    rng = random.Random(SEED)
    items = [{"task_type": "echo", "priority": rng.choice(PRIORITY_LEVELS)} for _ in range(bench.n)]
    figures: dict[str, Any] = {"tasks": bench.n, "levels": list(PRIORITY_LEVELS)}
    await servers.recreate_database(bench.database_url)
    # An API-only server takes the whole backlog before anything is claimed, so every task
    # is waiting at every claim and the order judged is the claimer's alone.
    async with servers.taskd(bench.database_url, bench.logs, workers=0, ports=bench.ports,
                             source=bench.source) as api:
        progress(f"  queueing {bench.n:,} echo tasks of mixed priority on {api.url}, no workers")
        batches, make = _batches(items)
        # One connection: ids, and so the submission order, follow the list.
        result = await rawhttp.closed_loop(api.url, batches, 1, make)
    ids = _ids(result)
    if len(ids) != bench.n:
        raise RuntimeError(f"queued {len(ids)} of {bench.n} tasks: {result.errors[:3]}")
    async with (servers.taskd(bench.database_url, bench.logs, ports=bench.ports, source=bench.source) as server,
                Finished(bench, server.url) as finished):
        progress(f"  draining on {server.url}")
        await finished.wait(ids, "priority")
        figures["outcome"] = await finished.outcome(ids)
        assert finished.conn is not None  # our own server: its rows are ours to read
        rows = await finished.conn.fetch(STARTS_SQL, ids)
    figures.update(start_order(rows), server_rss_peak_mb=server.rss_peak_mb,
                   server_log_problems=server.log_problems() or api.log_problems())
    return figures


def start_order(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How many tasks started out of priority order, and out of submission order within one.

    A claim stamps all its tasks with one started_at (its transaction's now()) and takes the
    best of what is waiting with no order among them, so order is judged between claims, not
    by a time tolerance. X is out of priority order when a task Y of higher priority that was
    already waiting when X was claimed (Y.created_at <= X.started_at) started in a later
    claim; inverted_pairs counts every such (X, Y). Out of submission order: a task of the
    same priority with a smaller id (queued before X, over one connection) started later.
    """
    by_start = sorted(rows, key=lambda r: r["started_at"], reverse=True)
    claims = [list(group) for _, group in itertools.groupby(by_start, key=lambda r: r["started_at"])]
    levels = sorted({r["priority"] for r in rows})
    # Of the tasks in claims after the one at hand: created_at (sorted) and the smallest id, per priority.
    later_created: dict[int, list[dt.datetime]] = {p: [] for p in levels}
    later_first_id: dict[int, float] = {p: math.inf for p in levels}
    out_of_priority = pairs = out_of_submission = 0
    for claim in claims:  # latest first
        started = claim[0]["started_at"]
        for row in claim:
            above = sum(bisect.bisect_right(later_created[p], started) for p in levels if p > row["priority"])
            pairs += above
            out_of_priority += above > 0
            out_of_submission += later_first_id[row["priority"]] < row["id"]
        for row in claim:
            bisect.insort(later_created[row["priority"]], row["created_at"])
            later_first_id[row["priority"]] = min(later_first_id[row["priority"]], row["id"])
    first = min((r["started_at"] for r in rows), default=None)
    starts: dict[str, dict[str, Any]] = {}
    for level in reversed(levels):  # highest first, the order they should start in
        offsets = [(r["started_at"] - first).total_seconds() * 1000 for r in rows if r["priority"] == level]
        starts[str(level)] = {"tasks": len(offsets), "first_ms": rounded(min(offsets)),
                              "p50_ms": rounded(percentile(offsets, 50)), "last_ms": rounded(max(offsets))}
    return {"started": len(rows), "claims": len(claims), "out_of_priority_order": out_of_priority,
            "inverted_pairs": pairs, "out_of_submission_order": out_of_submission,
            "start_after_first_by_priority": starts}


async def scheduled(bench: Bench) -> dict[str, Any]:
    if not bench.sql:
        raise Skip("against --url it needs --database-url of that server's database")
    count, window = bench.scheduled_tasks, bench.duration
    offsets = [SCHEDULE_LEAD + window * i / count for i in range(count)]
    random.Random(SEED).shuffle(offsets)  # out of due order, so claims must go by run_at, not by id
    figures: dict[str, Any] = {"tasks": count, "window_s": window, "lead_s": SCHEDULE_LEAD}
    async with taskd_under_test(bench, figures) as url, Finished(bench, url) as finished:
        now = dt.datetime.now(ZONE)
        items = [{"task_type": "echo", "delay_seconds": offset} if i % 2 else
                 {"task_type": "echo", "run_at": (now + dt.timedelta(seconds=offset)).isoformat()}
                 for i, offset in enumerate(offsets)]
        progress(f"  {count} echo tasks due over {window:g}s on {url}")
        batches, make = _batches(items)
        result = await rawhttp.closed_loop(url, batches, 1, make)
        ids = _ids(result)
        if len(ids) != count:
            raise RuntimeError(f"submitted {len(ids)} of {count} tasks: {result.errors[:3]}")
        await finished.wait(ids, "scheduled")
        figures["outcome"] = await finished.outcome(ids)
        assert finished.conn is not None  # bench.sql
        lateness = [r["lateness"] for r in await finished.conn.fetch(LATENESS_SQL, ids)]
    p99 = percentile(lateness, 99)
    figures.update(lateness_ms={**latency_ms(lateness), "max": rounded(max(lateness) * 1000, 2),
                                "min": rounded(min(lateness) * 1000, 2)},
                   early=sum(late < 0 for late in lateness),
                   p99_under_goal=p99 is not None and p99 < LATENESS_GOAL, goal_s=LATENESS_GOAL,
                   submit_elapsed_s=rounded(result.elapsed, 3))
    return figures
