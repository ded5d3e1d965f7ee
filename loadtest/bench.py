"""The taskd benchmark: named scenarios, a table for people, JSON for machines.

    python -m loadtest.bench                         # every scenario, servers started here
    python -m loadtest.bench submit drain -n 5000    # some of them
    python -m loadtest.bench submit --url http://127.0.0.1:8000 --json

What each scenario measures is in loadtest/scenarios.py (priority and scheduled: in
loadtest/ordering.py; neither is in the default set). Unless --url is given, the bench
starts `python -m taskd` itself for every scenario, on a free port, with a freshly created
database (--database-url, default taskd_bench on the local PostgreSQL, dropped at the end),
and stops it with SIGTERM. Ratios compare scenarios run in the same invocation only, since
this machine's speed varies from run to run. Progress goes to stderr.

    python -m loadtest.bench priority -n 5000 --json
    python -m loadtest.bench scheduled --scheduled-tasks 200 --duration 10 --json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import json
import pathlib
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from loadtest import longevity, ordering, retention, scenarios, servers
from loadtest.report import git_revision, machine, progress, versions
from loadtest.scenarios import Bench, Skip

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1/taskd_bench"
ORDER = ("bare", "submit", "batch", "drain", "latency", "history", "pgqueuer", "memory", "priority",
         "scheduled", "prune", "stats", "mixed")
DEFAULT = ("bare", "submit", "batch", "drain", "latency", "history", "pgqueuer")  # memory takes minutes
# name of the ratio -> (scenario, figure) over (reference scenario, figure)
RATIOS = {
    "drain/pgqueuer": (("drain", "tasks_per_s"), ("pgqueuer", "drain_per_s")),
    "batch/pgqueuer": (("batch", "completed_per_s"), ("pgqueuer", "drain_per_s")),
    "batch_submit/pgqueuer_enqueue": (("batch", "submitted_per_s"), ("pgqueuer", "enqueue_per_s")),
    "submit/bare": (("submit", "req_per_s"), ("bare", "req_per_s")),
    "e2e/bare": (("submit", "e2e_tasks_per_s"), ("bare", "req_per_s")),
    "history/drain": (("history", "tasks_per_s"), ("drain", "tasks_per_s")),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.splitlines()[0],
                                     epilog="scenarios: " + ", ".join(ORDER))
    add = parser.add_argument
    add("scenarios", nargs="*", metavar="scenario", help="default: all, in the order above")
    add("--url", help="measure this running taskd instead of starting one")
    add("--database-url", help=f"the database created and dropped for each scenario (default "
        f"{DEFAULT_DATABASE_URL}); with --url, that server's own database, read by the SQL-timed "
        "scenarios and written by drain")
    add("-n", type=int, default=20_000, help="tasks per scenario (default 20,000)")
    add("-c", type=int, default=50, help="client connections (default 50)")
    add("--rate", default="100,500", help="latency: tasks/s, comma-separated (default 100,500)")
    add("--duration", type=float, default=10.0,
        help="latency: seconds per rate; scheduled: the seconds the due times spread over (default 10)")
    add("--history-rows", type=int, default=1_000_000, help="history: finished rows (default 1,000,000)")
    add("--http-workers", default="1", help="submit: HTTP processes, comma-separated (default 1), e.g. 1,2")
    add("--memory-tasks", type=int, default=1_000_000, help="memory: tasks (default 1,000,000)")
    add("--scheduled-tasks", type=int, default=200, help="scheduled: tasks (default 200)")
    add("--stats-rows", type=int, default=10_000_000,
        help="stats: finished rows, and a tenth as many waiting (default 10,000,000)")
    add("--reads", type=int, default=200, help="stats: requests per route (default 200)")
    add("--backlog-rows", type=int, default=1_000_000,
        help="mixed: tasks waiting in another queue (default 1,000,000)")
    add("--rounds", type=int, default=5, help="mixed: interleaved rounds (default 5)")
    add("--taskd-source", type=pathlib.Path, metavar="DIR",
        help="run `python -m taskd` from this source tree instead of this checkout (loadtest.compare)")
    add("--ports", metavar="LO-HI", help="ports the bench's own servers may use (default: any free one)")
    add("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in ORDER]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    if min(args.n, args.c, args.scheduled_tasks, args.stats_rows, args.reads, args.backlog_rows, args.rounds) < 1:
        parser.error("-n, -c, --scheduled-tasks, --stats-rows, --reads, --backlog-rows and --rounds must be at "
                     "least 1")
    if args.duration <= 0:
        parser.error("--duration must be more than 0")
    if args.taskd_source is not None and not (args.taskd_source / "taskd" / "__main__.py").is_file():
        parser.error(f"--taskd-source {args.taskd_source}: no taskd/__main__.py there")
    try:
        args.rate = [float(r) for r in args.rate.split(",") if r.strip()]
    except ValueError:
        parser.error("--rate takes numbers, e.g. 100,500")
    try:
        args.http_workers = [int(w) for w in args.http_workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--http-workers takes whole numbers, e.g. 1,2")
    if args.ports:
        lo, _, hi = args.ports.partition("-")
        if not (lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi) < 65536):
            parser.error("--ports takes LO-HI, e.g. 18000-18999")
        args.ports = range(int(lo), int(hi) + 1)
    return args


Run = Callable[[], Awaitable[dict[str, Any]]]


def plan(args: argparse.Namespace, bench: Bench) -> list[tuple[str, Run]]:
    """(result key, scenario call) for every scenario to run, latency once per rate."""
    chosen = [name for name in ORDER if name in args.scenarios] or list(DEFAULT)
    runs: list[tuple[str, Run]] = []
    for name in chosen:
        if name == "latency":
            runs += [(f"latency_{rate:g}", functools.partial(scenarios.latency, bench, rate))
                     for rate in args.rate]
        elif name == "submit":
            runs += [("submit" if w == 1 else f"submit_hw{w}", functools.partial(scenarios.submit, bench, w))
                     for w in args.http_workers]
        else:
            module = (ordering if name in ("priority", "scheduled") else retention if name == "prune"
                      else longevity if name in ("stats", "mixed") else scenarios)
            runs.append((name, functools.partial(getattr(module, name), bench)))
    return runs


async def run(args: argparse.Namespace, logs: pathlib.Path) -> dict[str, Any]:
    bench = Bench(n=args.n, c=args.c, duration=args.duration, history_rows=args.history_rows,
                  database_url=args.database_url or DEFAULT_DATABASE_URL, logs=logs, url=args.url,
                  live_sql=bool(args.url and args.database_url), ports=args.ports,
                  memory_tasks=args.memory_tasks, scheduled_tasks=args.scheduled_tasks,
                  stats_rows=args.stats_rows, reads=args.reads, backlog_rows=args.backlog_rows, rounds=args.rounds,
                  source=args.taskd_source.resolve() if args.taskd_source else None)
    if args.url is None:
        servers.database_name(bench.database_url)  # fail now on a name we could not drop
    results: dict[str, Any] = {}
    try:
        for key, start in plan(args, bench):
            progress(f"[{key}]")
            began = time.perf_counter()
            try:
                results[key] = await start()
            except Skip as exc:
                results[key] = {"skipped": str(exc)}
            except Exception as exc:  # one broken scenario must not lose the others' figures
                traceback.print_exc(file=sys.stderr)
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
            progress(f"  done in {time.perf_counter() - began:.1f}s")
    finally:
        if args.url is None:
            await servers.drop_database(bench.database_url)
    return {
        "scenarios": results,
        "ratios": ratios(results),
        "params": {"n": args.n, "c": args.c, "rate": args.rate, "duration_s": args.duration,
                   "history_rows": args.history_rows, "scheduled_tasks": args.scheduled_tasks,
                   "url": args.url or "started by the bench",
                   "taskd_source": str(args.taskd_source or "this checkout")},
        "machine": machine(),
        "versions": versions(),
        "git_revision": git_revision(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, ((scenario, figure), (ref, ref_figure)) in RATIOS.items():
        value = results.get(scenario, {}).get(figure)
        reference = results.get(ref, {}).get(ref_figure)
        if value and reference:
            out[name] = round(value / reference, 3)
    return out


def table_rows(key: str, fig: dict[str, Any]) -> list[tuple[str, str, Any, Any, Any]]:
    """(scenario, figure, value, p99 ms, p50 ms) rows; p99 first, as we read it first."""
    def lat(name: str) -> tuple[Any, Any]:
        d = fig.get(name) or {}
        return d.get("p99"), d.get("p50")

    if "skipped" in fig or "error" in fig:
        return [(key, "skipped (see below)" if "skipped" in fig else "ERROR (see below)", None, None, None)]
    if key == "bare":
        return [(key, "req/s (HTTP latency)", fig["req_per_s"], *lat("latency_ms"))]
    if key.startswith("submit"):
        return [(key, f"submitted req/s, {fig.get('http_workers', 1)} HTTP process(es)", fig["req_per_s"],
                 *lat("latency_ms")),
                (key, "end-to-end tasks/s", fig["e2e_tasks_per_s"], None, None)]
    if key == "batch":
        return [(key, "submitted tasks/s (per request)", fig["submitted_per_s"], *lat("latency_ms")),
                (key, "completed tasks/s", fig["completed_per_s"], None, None)]
    if key in ("drain", "history"):
        what = f"tasks/s ({fig['tasks']:,} tasks, {fig['history_rows']:,} history)"
        return [(key, what, fig["tasks_per_s"], None, None)]
    if key.startswith("latency"):
        rows = [(key, "achieved tasks/s (HTTP submit latency)", fig["achieved_per_s"], *lat("latency_ms"))]
        if "submit_to_start_ms" in fig:
            rows += [(key, "submit -> start", None, *lat("submit_to_start_ms")),
                     (key, "submit -> done", None, *lat("submit_to_done_ms"))]
        return rows
    if key == "pgqueuer":
        enqueue, drain = f"batches of {fig['enqueue_batch']}", f"batch size {fig['dequeue_batch']}"
        return [(key, f"enqueue jobs/s ({enqueue})", fig["enqueue_per_s"], None, None),
                (key, f"drain jobs/s ({drain})", fig["drain_per_s"], None, None)]
    if key == "memory":
        return [(key, f"tasks/s ({fig['tasks']:,} tasks in batches)", fig["tasks_per_s"], None, None),
                (key, "RSS MB at 100,000 / peak after / end",
                 f"{fig['rss_at_100k_mb']} / {fig['rss_peak_after_100k_mb']} / {fig['rss_end_mb']}", None, None)]
    if key == "prune":
        return retention.table_rows(fig)
    if key in ("stats", "mixed"):
        return longevity.table_rows(key, fig)
    if key == "priority":
        return [(key, f"started out of priority order ({fig['tasks']:,} tasks, {fig['claims']:,} claims)",
                 fig["out_of_priority_order"], None, None),
                (key, "started out of submission order within a priority", fig["out_of_submission_order"],
                 None, None)]
    if key == "scheduled":
        late = fig["lateness_ms"]
        return [(key, f"lateness ({fig['tasks']} tasks over {fig['window_s']:g}s): max ms, early",
                 f"{late['max']} / {fig['early']}", late["p99"], late["p50"])]
    return [(key, "?", None, None, None)]


def render(report: dict[str, Any]) -> str:
    rows = [["scenario", "figure", "value", "p99 ms", "p50 ms", "RSS MB"]]
    notes = []
    for key, fig in report["scenarios"].items():
        rss = fig.get("server_rss_peak_mb")
        for i, row in enumerate(table_rows(key, fig)):
            rows.append(["" if v is None else str(v) for v in (*row, rss if i == 0 else None)])
        if "skipped" in fig or "error" in fig:
            notes.append(f"{key}: {fig.get('skipped') or fig['error']}")
        elif fig.get("server_log_problems"):
            notes.append(f"{key}: the server logged {fig['server_log_problems']['count']} warnings/errors")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += [f"ratio {name}: {value}" for name, value in report["ratios"].items()]
    lines += notes
    m, v = report["machine"], report["versions"]
    lines.append(f"nproc {m['nproc']}, python {v['python']}, trio {v['trio']}, hypercorn {v['hypercorn']}, "
                 f"asyncpg {v['asyncpg']}, pgqueuer {v['pgqueuer']}; git {report['git_revision']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logs = pathlib.Path(tempfile.mkdtemp(prefix="taskd-bench-"))
    report = asyncio.run(run(args, logs))
    if any("error" in fig or fig.get("server_log_problems") for fig in report["scenarios"].values()):
        report["server_logs"] = str(logs)  # something to read in them
    else:
        shutil.rmtree(logs, ignore_errors=True)
    if args.json:
        print(render(report), file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(render(report))


if __name__ == "__main__":
    main()
