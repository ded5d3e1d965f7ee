"""Routes for watching the service: /stats, /stats/detailed, /health and /ready.

Imports taskd.http.common, taskd.store, taskd.schemas, taskd.config, taskd.models.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from quart import Blueprint, Response
from quart_schema import document_response

from taskd.config import Settings
from taskd.http.common import iso, json_response
from taskd.models import TaskStatus, WorkerGauge
from taskd.schemas import DetailedStatsOut, Health, StatsOut
from taskd.store import Store


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _percentiles(avg: float | None, values: Sequence[float] | None) -> dict[str, float | None]:
    p50, p95, p99 = values if values else (None, None, None)
    return {
        "avg": None if avg is None else round(float(avg), 3),
        "p50": None if p50 is None else round(p50, 3),
        "p95": None if p95 is None else round(p95, 3),
        "p99": None if p99 is None else round(p99, 3),
    }


def stats_blueprint(store: Store, settings: Settings, gauge: WorkerGauge) -> Blueprint:
    bp = Blueprint("stats", __name__)
    started = time.monotonic()

    @bp.get("/stats")
    @document_response(StatsOut)
    async def stats() -> Response:
        """Counts per status, this process's workers, recent throughput, success rate, uptime."""
        counts = await store.counts()
        recent = await store.recent(60)
        finished = counts["completed"] + counts["failed"]
        return json_response({
            "counts": counts,
            "total": sum(counts.values()),
            "workers": {"busy": gauge.busy, "size": gauge.size},
            "completed_last_60s": recent["completed"],
            "failed_last_60s": recent["failed"],
            "success_rate": _rate(counts["completed"], finished),
            "uptime_seconds": round(time.monotonic() - started, 3),
        })

    @bp.get("/stats/detailed")
    @document_response(DetailedStatsOut)
    async def stats_detailed() -> Response:
        """Per task type counts, success and retry-success rates, run time and queue wait
        percentiles (tasks finished in the last hour); a per-second timeline of the last
        15 minutes; database pool use; the live worker processes."""
        timings = {row["task_type"]: row for row in await store.timings_by_type()}
        by_type = []
        for row in await store.by_type():
            t = timings.get(row["task_type"], {})
            finished = row["completed"] + row["failed"]
            by_type.append({
                "task_type": row["task_type"],
                "counts": {s.value: row[s.value] for s in TaskStatus},
                "total": row["total"],
                "success_rate": _rate(row["completed"], finished),
                "retry_success_rate": _rate(row["completed_after_retry"], row["finished_after_retry"]),
                "finished_last_hour": t.get("n", 0),
                "run_time_ms": _percentiles(t.get("run_avg"), t.get("run_pct")),
                "queue_wait_ms": _percentiles(t.get("wait_avg"), t.get("wait_pct")),
            })
        timeline = [{"second": iso(r["second"]), "completed": r["completed"], "failed": r["failed"]}
                    for r in await store.timeline()]
        processes = [
            {**p, "started_at": iso(p["started_at"]), "last_seen": iso(p["last_seen"])}
            for p in await store.live_processes(seen_within=2 * settings.lease_seconds)
        ]
        return json_response({"by_type": by_type, "timeline": timeline, "database_pool": store.pool_usage(),
                              "processes": processes})

    @bp.get("/health")
    @document_response(Health)
    async def health() -> Response:
        """The process is up."""
        return json_response({"status": "ok"})

    @bp.get("/ready")
    @document_response(Health)
    @document_response(Health, 503)
    async def ready() -> Response:
        """The database answers (503 while it does not)."""
        if await store.ping():
            return json_response({"status": "ready"})
        return json_response({"status": "database unavailable"}, 503)

    return bp
