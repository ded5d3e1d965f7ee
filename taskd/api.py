"""The HTTP API: JSON in -> Store -> JSON out. No nursery of its own.

Every error, including bad input the framework itself rejects, is
`{"error": {"code", "message", "details"}}` with the right 4xx; nothing is
written for a rejected request.
Imports taskd.store, taskd.registry, taskd.schemas, taskd.config, taskd.models, taskd.errors.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from pydantic import ValidationError
from quart import Response, request
from quart_schema import (
    QuartSchema,
    document_querystring,
    document_request,
    document_response,
)
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from taskd.coalescer import CoalescerClosed
from taskd.config import Settings
from taskd.errors import DatabaseError, DatabaseUnavailable, InvalidTask
from taskd.models import NewTask, Task, TaskPage, TaskStatus, TaskSummary, WorkerGauge
from taskd.registry import Registry
from taskd.schemas import (
    FULL_PAGE_BYTES,
    BatchCreated,
    BatchIn,
    DetailedStatsOut,
    ErrorOut,
    Health,
    ListQuery,
    ResultOut,
    StatsOut,
    TaskCreated,
    TaskIn,
    TaskListOut,
    TaskOut,
    WaitQuery,
)
from taskd.store import Store

log = logging.getLogger("taskd.api")

MAX_ID = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")  # str.isdigit() also accepts '²' and other digits int() refuses
JSON_HEADERS = {"Content-Type": "application/json"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.close = close  # the body was left unread: the connection cannot be reused


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status,
                    headers={**JSON_HEADERS, **(headers or {})})


def error_response(status: int, code: str, message: str, details: Any = None) -> Response:
    return _json({"error": {"code": code, "message": message, "details": details}}, status)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _object_parts(fields: Iterable[tuple[str, str]]) -> list[str]:
    """The pieces of a JSON object whose values are JSON text already (keys are taskd's own, plain)."""
    parts = ["{"]
    for key, value in fields:
        parts += [f'"{key}":', value, ","]
    parts[-1] = "}"
    return parts


def task_json_parts(task: Task) -> list[str]:
    """A task as pieces of JSON text: payload, result and errors are PostgreSQL's jsonb text,
    spliced in undecoded, and kept as they are (not copied) until the response is joined."""
    return _object_parts((
        ("id", str(task.id)),
        ("task_type", _dump(task.task_type)),
        ("status", _dump(task.status.value)),
        ("payload", task.payload_json),
        ("result", task.result_json or "null"),
        ("attempts", str(task.attempts)),
        ("max_retries", str(task.max_retries)),
        ("crashes", str(task.crashes)),
        ("priority", str(task.priority)),
        ("run_at", _dump(_iso(task.run_at))),
        ("timeout_seconds", _dump(task.timeout_seconds)),
        ("created_at", _dump(_iso(task.created_at))),
        ("started_at", _dump(_iso(task.started_at))),
        ("finished_at", _dump(_iso(task.finished_at))),
        ("last_error", task.last_error_json or "null"),
        ("errors", task.errors_json),
    ))


def summary_json(task: TaskSummary) -> dict[str, Any]:
    return {
        "id": task.id,
        "task_type": task.task_type,
        "status": task.status.value,
        "attempts": task.attempts,
        "max_retries": task.max_retries,
        "crashes": task.crashes,
        "priority": task.priority,
        "run_at": _iso(task.run_at),
        "created_at": _iso(task.created_at),
        "started_at": _iso(task.started_at),
        "finished_at": _iso(task.finished_at),
        "last_error": {"type": task.error_type, "message": task.error_message} if task.has_error else None,
    }


def _full_page_text(page: TaskPage) -> str:
    parts = ['{"items":[']
    for task in page.tasks:
        parts += task_json_parts(task)
        parts.append(",")
    if page.tasks:
        parts.pop()
    cursor = None if page.next_before_id is None else str(page.next_before_id)
    parts += ['],"next_cursor":', _dump(cursor), "}"]
    return "".join(parts)


def _json_text(text: str, status: int = 200) -> Response:
    return Response(text, status=status, headers=JSON_HEADERS)


def _validation_details(exc: ValidationError, prefix: Sequence[str | int] = ()) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [*prefix, *err["loc"]]
        details.append({"loc": ".".join(str(part) for part in loc), "message": err["msg"], "type": err["type"]})
    return details


def _raise_validation(exc: ValidationError) -> NoReturn:
    details = _validation_details(exc)
    if any(d["type"] == "json_invalid" for d in details):
        raise ApiError(400, "malformed_json", "the request body is not valid JSON", details)
    first = details[0]
    where = f"{first['loc']}: " if first["loc"] else ""
    raise ApiError(422, "invalid_request", f"{where}{first['message']}", details)


async def _body() -> bytes:
    """The request body, insisting on JSON (415 otherwise); over MAX_BODY_BYTES Quart raises 413."""
    # Read before judging: a response sent while the body is still unread can leave
    # hypercorn's keep-alive connection stuck, so the client's next request hangs.
    body: bytes = await request.get_data(cache=False, as_text=False)  # type: ignore[assignment]
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"send JSON with Content-Type: application/json (got {mimetype or 'none'})")
    return body


def _task_id(task_id: int) -> int:
    if task_id < 1 or task_id > MAX_ID:
        raise ApiError(404, "not_found", f"no task with id {task_id}")
    return task_id


def _query(model: type[Any]) -> Any:
    args = request.args.to_dict()
    for name, value in args.items():
        if "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise ApiError(422, "invalid_query", f"{name}: must not contain the NUL character")
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        first = _validation_details(exc)[0]
        raise ApiError(422, "invalid_query", f"{first['loc']}: {first['message']}",
                       _validation_details(exc)) from None


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


def _initial_status(task: NewTask) -> str:
    """What a new task is reported as: scheduled if it may not run yet."""
    later = (task.delay_seconds or 0) > 0 or (task.run_at is not None and task.run_at > dt.datetime.now(dt.UTC))
    return TaskStatus.SCHEDULED.value if later else TaskStatus.PENDING.value


def create_app(store: Store, registry: Registry, settings: Settings, gauge: WorkerGauge) -> QuartTrio:
    """The Quart-Trio app serving the REST API and its OpenAPI documents."""
    app = QuartTrio("taskd")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    QuartSchema(
        app,
        info={"title": "taskd", "version": "0.1.0",
              "description": "A PostgreSQL-backed task queue: submit tasks, watch them run, read results."},
        redoc_ui_path="/redoc",
        scalar_ui_path=None,
    )
    started = time.monotonic()

    def new_task(data: TaskIn) -> Any:
        return registry.new_task(settings, data.task_type, data.payload,
                                 max_retries=data.max_retries, timeout_seconds=data.timeout_seconds,
                                 priority=data.priority, run_at=data.run_at, delay_seconds=data.delay_seconds)

    @app.before_request
    async def refuse_oversized_bodies() -> None:
        # Decided from the header, before any of the body is read.
        length = request.content_length
        if length is not None and length > settings.max_body_bytes:
            raise ApiError(413, "request_entity_too_large",
                           f"the request body is larger than {settings.max_body_bytes} bytes", close=True)

    @app.errorhandler(ApiError)
    async def on_api_error(exc: ApiError) -> Response:
        response = error_response(exc.status, exc.code, exc.message, exc.details)
        if exc.close:
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(InvalidTask)
    async def on_invalid_task(exc: InvalidTask) -> Response:
        return error_response(422, "invalid_task", exc.message, {"field": exc.field})

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        message = {413: f"the request body is larger than {settings.max_body_bytes} bytes"}.get(
            exc.code or 500, exc.description or exc.name)
        response = error_response(exc.code or 500, code, message)
        if exc.code == 413:  # the body was left unread: the connection cannot be reused
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(DatabaseUnavailable)
    async def on_db_down(exc: DatabaseUnavailable) -> Response:
        # Debug only: the outage itself is logged once, by the store, not once per request.
        log.debug("request failed, database unavailable: %s", exc)
        return error_response(503, "database_unavailable", "the database is unreachable; try again")

    @app.errorhandler(CoalescerClosed)
    async def on_closing(exc: CoalescerClosed) -> Response:
        return error_response(503, "shutting_down", "the server is shutting down; try another or retry")

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        if isinstance(exc, DatabaseError):
            return error_response(500, "database_error", "the database rejected the request")
        return error_response(500, "internal_error", "an unexpected error; it has been logged")

    @app.post("/tasks")
    @document_request(TaskIn)
    @document_response(TaskCreated, 201)
    @document_response(ErrorOut, 422)
    async def create_task() -> Response:
        """Submit one task."""
        try:
            data = TaskIn.model_validate_json(await _body())
        except ValidationError as exc:
            _raise_validation(exc)
        task = new_task(data)
        task_id = await store.submit(task)
        return _json({"id": task_id, "task_type": task.task_type, "status": _initial_status(task),
                      "url": f"/tasks/{task_id}"}, 201, {"Location": f"/tasks/{task_id}"})

    @app.post("/tasks/batch")
    @document_request(BatchIn)
    @document_response(BatchCreated, 201)
    @document_response(ErrorOut, 422)
    async def create_batch() -> Response:
        """Submit 1 to 1,000 tasks at once, all or nothing; a 422 names the bad item's index."""
        try:
            batch = BatchIn.model_validate_json(await _body())
        except ValidationError as exc:
            _raise_validation(exc)
        tasks = []
        for index, item in enumerate(batch.tasks):
            try:
                tasks.append(new_task(item))
            except InvalidTask as exc:
                raise ApiError(422, "invalid_task", f"tasks[{index}]: {exc.message}",
                               {"index": index, "field": exc.field}) from None
        ids = await store.submit_many(tasks)
        return _json({"ids": ids, "count": len(ids)}, 201)

    @app.get("/tasks/<int:task_id>")
    @document_response(TaskOut)
    @document_response(ErrorOut, 404)
    async def get_task(task_id: int) -> Response:
        """One task: its status, attempts, timestamps and every attempt's error."""
        task = await store.get(_task_id(task_id))
        if task is None:
            raise ApiError(404, "not_found", f"no task with id {task_id}")
        return _json_text("".join(task_json_parts(task)))

    @app.get("/tasks/<int:task_id>/result")
    @document_querystring(WaitQuery)
    @document_response(ResultOut)
    @document_response(ResultOut, 202)
    @document_response(ErrorOut, 404)
    async def get_result(task_id: int) -> Response:
        """The result (200) once the task is completed or failed, else its status (202); ?wait=S waits."""
        query = _query(WaitQuery)
        task = await store.wait_finished(_task_id(task_id), query.wait)
        if task is None:
            raise ApiError(404, "not_found", f"no task with id {task_id}")
        if task.status == TaskStatus.COMPLETED:
            return _json_text("".join(_object_parts((
                ("id", str(task.id)), ("status", _dump(task.status.value)), ("result", task.result_json or "null")))))
        if task.status == TaskStatus.FAILED:
            return _json_text("".join(_object_parts((
                ("id", str(task.id)), ("status", _dump(task.status.value)),
                ("error", task.last_error_json or "null")))))
        return _json({"id": task.id, "status": task.status.value}, 202)

    @app.get("/tasks")
    @document_querystring(ListQuery)
    @document_response(TaskListOut)
    async def list_tasks() -> Response:
        """Tasks, newest first, filtered by status and task_type, a page at a time (keyset cursor).

        Summaries by default: no payload, result or error history, and of the last error only its type
        and the first 500 characters of its message. With ?full=true, full tasks; such a page is cut
        short after about 8 MB of JSON (it still holds at least one task, however large) and then
        carries a next_cursor to the rest.
        """
        query = _query(ListQuery)
        before: int | None = None
        if query.cursor is not None:
            if not _DIGITS.fullmatch(query.cursor) or not 1 <= int(query.cursor) <= MAX_ID:
                raise ApiError(422, "invalid_query", "cursor: must be a next_cursor from an earlier page")
            before = int(query.cursor)
        status = query.status.value if query.status else None
        if query.full:
            page = await store.list_tasks(status=status, task_type=query.task_type, before_id=before,
                                          limit=query.limit, max_bytes=FULL_PAGE_BYTES)
            text = _full_page_text(page)
            del page  # the rows' text is in `text` now: hold one copy, not two, while encoding
            return _json_text(text)
        summaries = await store.list_summaries(status=status, task_type=query.task_type, before_id=before,
                                               limit=query.limit)
        next_cursor = str(summaries[-1].id) if len(summaries) == query.limit else None
        return _json({"items": [summary_json(t) for t in summaries], "next_cursor": next_cursor})

    @app.delete("/tasks/<int:task_id>")
    @document_response(ErrorOut, 404)
    async def delete_task(task_id: int) -> Response:
        """Remove a task: a waiting one never runs, a running one is cancelled."""
        status = await store.delete(_task_id(task_id))
        if status is None:
            raise ApiError(404, "not_found", f"no task with id {task_id}")
        return Response("", status=204)

    @app.get("/stats")
    @document_response(StatsOut)
    async def stats() -> Response:
        """Counts per status, this process's workers, recent throughput, success rate, uptime."""
        counts = await store.counts()
        recent = await store.recent(60)
        finished = counts["completed"] + counts["failed"]
        return _json({
            "counts": counts,
            "total": sum(counts.values()),
            "workers": {"busy": gauge.busy, "size": gauge.size},
            "completed_last_60s": recent["completed"],
            "failed_last_60s": recent["failed"],
            "success_rate": _rate(counts["completed"], finished),
            "uptime_seconds": round(time.monotonic() - started, 3),
        })

    @app.get("/stats/detailed")
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
        timeline = [{"second": _iso(r["second"]), "completed": r["completed"], "failed": r["failed"]}
                    for r in await store.timeline()]
        processes = [
            {**p, "started_at": _iso(p["started_at"]), "last_seen": _iso(p["last_seen"])}
            for p in await store.live_processes(seen_within=2 * settings.lease_seconds)
        ]
        return _json({"by_type": by_type, "timeline": timeline, "database_pool": store.pool_usage(),
                      "processes": processes})

    @app.get("/health")
    @document_response(Health)
    async def health() -> Response:
        """The process is up."""
        return _json({"status": "ok"})

    @app.get("/ready")
    @document_response(Health)
    @document_response(Health, 503)
    async def ready() -> Response:
        """The database answers (503 while it does not)."""
        if await store.ping():
            return _json({"status": "ready"})
        return _json({"status": "database unavailable"}, 503)

    return app
