"""The bench's retention scenario.

    prune   --history-rows completed rows that finished 8 days ago (due under the default
            7-day retention), beside a tenth as many failed rows 10 days old (kept 30 days:
            not due), then a server with the default settings prunes them. Reports rows
            pruned per second over the whole backlog (the pauses between runs included) and
            within the runs alone, from the server's own log lines. Then the drain beside it:
            -n echo tasks queued over the same backlog, drained once while pruning runs and
            once with RETENTION_COMPLETED=0 (nothing pruned), tasks per second each (from the
            rows' timestamps, as the drain scenario does) and their ratio.

Needs servers the bench starts itself (it reads their logs). Imports the scenarios' shared
parts and nothing beyond them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from loadtest import servers
from loadtest.report import progress, rounded
from loadtest.scenarios import FINISH_TIMEOUT, PENDING_SQL, Bench, Finished, Skip

# Finished rows spread over a day of the past, `$2` days back: one statement, no round trip per row.
BACKLOG_SQL = """INSERT INTO taskd.tasks (task_type, payload, status, result, attempts, max_retries,
                                          timeout_seconds, created_at, started_at, finished_at)
                 SELECT 'echo', '{}'::jsonb, $1::text, '{}'::jsonb, 1, 3, 300, t, t, t
                 FROM (SELECT now() - make_interval(days => $2::int) - make_interval(secs => g % 86400) AS t
                       FROM generate_series(1, $3::int) AS g) AS s"""
# What taskd.retention logs after a run that deleted something (cli's log format).
PRUNED_LINE = re.compile(r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO taskd\.retention: pruned "
                         r"(?P<n>[\d,]+) finished tasks in (?P<took>[\d.]+)s")
LOG_POLL = 0.1


@dataclasses.dataclass(frozen=True)
class PruneLine:
    at: dt.datetime  # when the run ended, by this machine's clock
    rows: int
    took: float


def pruned_lines(path: pathlib.Path) -> list[PruneLine]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        match = PRUNED_LINE.match(line)
        if match:
            at = dt.datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f")
            lines.append(PruneLine(at, int(match["n"].replace(",", "")), float(match["took"])))
    return lines


async def _backlog(bench: Bench, conn: asyncpg.Connection, rows: int) -> None:
    progress(f"  inserting {rows:,} due completed rows and {rows // 10:,} failed rows not yet due")
    await conn.execute(BACKLOG_SQL, "completed", 8, rows)
    await conn.execute(BACKLOG_SQL, "failed", 10, rows // 10)


async def _fresh(bench: Bench) -> asyncpg.Connection:
    await servers.recreate_database(bench.database_url)
    await servers.migrate(bench.database_url, bench.logs, bench.ports, bench.source)
    return await asyncpg.connect(bench.database_url)


async def prune(bench: Bench) -> dict[str, Any]:
    if bench.url is not None:
        raise Skip("needs servers the bench starts itself (it reads their logs)")
    rows = bench.history_rows
    figures: dict[str, Any] = {"rows": rows, "tasks": bench.n}
    conn = await _fresh(bench)
    try:
        await _backlog(bench, conn, rows)
        await conn.execute("VACUUM ANALYZE taskd.tasks")
    finally:
        await conn.close()
    progress(f"  pruning {rows:,} rows with the default settings")
    async with servers.taskd(bench.database_url, bench.logs, extra=("--log-level", "INFO"), ports=bench.ports,
                             source=bench.source) as server:
        deadline = time.monotonic() + FINISH_TIMEOUT
        while sum(line.rows for line in pruned_lines(server.log_path)) < rows:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all {rows:,} due rows pruned after {FINISH_TIMEOUT:g}s")
            await asyncio.sleep(LOG_POLL)
    lines = pruned_lines(server.log_path)
    began = lines[0].at - dt.timedelta(seconds=lines[0].took)
    wall = (lines[-1].at - began).total_seconds()
    working = sum(line.took for line in lines)
    figures.update(pruned_per_s=rounded(rows / wall), pruned_per_s_in_runs=rounded(rows / working),
                   prune_elapsed_s=rounded(wall, 3), prune_runs=len(lines),
                   server_rss_peak_mb=server.rss_peak_mb, server_log_problems=server.log_problems())

    for label, extra in (("pruning", ()), ("reference", ("--retention-completed", "0"))):
        drained = await _drain_beside(bench, rows, extra)
        figures[f"drain_{label}_tasks_per_s"] = drained["tasks_per_s"]
        figures[f"drain_{label}"] = drained
    reference = figures["drain_reference_tasks_per_s"]
    if reference:
        figures["drain_pruning_vs_reference"] = round(figures["drain_pruning_tasks_per_s"] / reference, 3)
    return figures


async def _drain_beside(bench: Bench, rows: int, extra: Sequence[str]) -> dict[str, Any]:
    conn = await _fresh(bench)
    try:
        await _backlog(bench, conn, rows)
        lo, hi = await conn.fetchrow(PENDING_SQL, bench.n)
        await conn.execute("VACUUM ANALYZE taskd.tasks")
        progress(f"  draining {bench.n:,} echo tasks over the backlog ({' '.join(extra) or 'pruning beside'})")
        async with servers.taskd(bench.database_url, bench.logs, extra=("--log-level", "INFO", *extra),
                                 ports=bench.ports, source=bench.source) as server:
            async with Finished(bench, server.url) as finished:
                await finished.wait(range(lo, hi + 1), "drain")
                outcome = await finished.outcome(range(lo, hi + 1))
        first, last = await conn.fetchrow(
            "SELECT min(started_at), max(finished_at) FROM taskd.tasks WHERE id BETWEEN $1 AND $2", lo, hi)
    finally:
        await conn.close()
    elapsed = (last - first).total_seconds()
    # Rows the server pruned by the time the drain ended (its log is this machine's local time).
    end = last.astimezone().replace(tzinfo=None)
    pruned = sum(line.rows for line in pruned_lines(server.log_path) if line.at <= end)
    return {"tasks_per_s": rounded(bench.n / elapsed), "elapsed_s": rounded(elapsed, 3), "outcome": outcome,
            "pruned_by_the_end": pruned, "server_log_problems": server.log_problems()}


def table_rows(fig: dict[str, Any]) -> list[tuple[str, str, Any, Any, Any]]:
    """The bench table's rows for this scenario: (scenario, figure, value, p99 ms, p50 ms)."""
    return [
        ("prune", f"rows pruned/s ({fig['rows']:,} due; pauses between runs included)", fig["pruned_per_s"],
         None, None),
        ("prune", f"rows pruned/s within runs ({fig['prune_runs']} runs)", fig["pruned_per_s_in_runs"], None, None),
        ("prune", f"drain tasks/s while pruning ({fig['tasks']:,} tasks)", fig["drain_pruning_tasks_per_s"],
         None, None),
        ("prune", "drain tasks/s, RETENTION_COMPLETED=0", fig["drain_reference_tasks_per_s"], None, None),
    ]
