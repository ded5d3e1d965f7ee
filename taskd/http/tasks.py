"""Routes for tasks: submit (one or a batch, idempotent with a key), read, list, wait for a
result, cancel, retry (one, or every match of a filter), delete.

Imports taskd.http.common, taskd.store, taskd.registry, taskd.schemas, taskd.config,
taskd.models, taskd.errors.
"""

from __future__ import annotations

import datetime as dt

from quart import Blueprint, Response, request
from quart_schema import document_headers, document_querystring, document_request, document_response

from taskd.config import Settings
from taskd.errors import IdempotencyConflict, InvalidTask
from taskd.http.common import (
    DIGITS,
    MAX_ID,
    ApiError,
    body,
    dump,
    full_page_text,
    json_response,
    json_text,
    object_parts,
    parse_body,
    query,
    summary_json,
    task_id_in_range,
    task_json,
)
from taskd.models import CANCELLABLE, RETRYABLE, NewTask, Submitted, TaskStatus
from taskd.registry import Registry
from taskd.schemas import (
    FULL_PAGE_BYTES,
    BatchCreated,
    BatchIn,
    CancelFilter,
    CancelledOut,
    ErrorOut,
    IdempotencyHeader,
    ListQuery,
    LocationHeader,
    ResultOut,
    RetriedOut,
    RetryFilter,
    TaskCreated,
    TaskIn,
    TaskListOut,
    TaskOut,
    WaitQuery,
)
from taskd.store import Store

IDEMPOTENCY_HEADER = "Idempotency-Key"
# How long POST /tasks/{id}/cancel waits for a running task to stop before answering.
CANCEL_WAIT_SECONDS = 2.0


def _not_found(task_id: int) -> ApiError:
    return ApiError(404, "not_found", f"no task with id {task_id}")


def _conflict(exc: IdempotencyConflict) -> ApiError:
    return ApiError(409, "idempotency_conflict",
                    f"idempotency key {exc.key!r} was already used, for task {exc.task_id}, with another request "
                    "body; send the same body to get that task, or use a new key",
                    {"key": exc.key, "task_id": exc.task_id})


def _created_response(submitted: Submitted, task_type: str) -> Response:
    url = f"/tasks/{submitted.id}"
    return json_response({"id": submitted.id, "task_type": task_type, "status": submitted.status.value, "url": url},
                         201 if submitted.created else 200, {"Location": url})


def tasks_blueprint(store: Store, registry: Registry, settings: Settings) -> Blueprint:
    bp = Blueprint("tasks", __name__)

    def new_task(data: TaskIn, idempotency_key: str | None = None) -> NewTask:
        return registry.new_task(settings, data.task_type, data.payload,
                                 max_retries=data.max_retries, timeout_seconds=data.timeout_seconds,
                                 priority=data.priority, run_at=data.run_at, delay_seconds=data.delay_seconds,
                                 queue=data.queue, expires_at=data.expires_at,
                                 expires_in_seconds=data.expires_in_seconds,
                                 idempotency_key=idempotency_key or data.idempotency_key)

    @bp.post("/tasks")
    @document_request(TaskIn)
    @document_headers(IdempotencyHeader)
    @document_response(TaskCreated, 201, LocationHeader)
    @document_response(TaskCreated, 200, LocationHeader)
    @document_response(ErrorOut, 409)
    @document_response(ErrorOut, 422)
    async def create_task() -> Response:
        """Submit one task (201). With an idempotency key (in the body, or the Idempotency-Key
        header) a repeat of the same request returns the task it made (200); the same key with
        another body is a 409."""
        data = parse_body(TaskIn, await body())
        header = request.headers.get(IDEMPOTENCY_HEADER)
        if header is not None:
            if not 1 <= len(header) <= 200:
                raise ApiError(422, "invalid_request", f"{IDEMPOTENCY_HEADER} header: 1 to 200 characters")
            if data.idempotency_key is not None and data.idempotency_key != header:
                raise ApiError(422, "invalid_request",
                               f"the {IDEMPOTENCY_HEADER} header and idempotency_key in the body differ")
        task = new_task(data, header)
        try:
            submitted = await store.submit(task)
        except IdempotencyConflict as exc:
            raise _conflict(exc) from None
        return _created_response(submitted, task.task_type)

    @bp.post("/tasks/batch")
    @document_request(BatchIn)
    @document_response(BatchCreated, 201)
    @document_response(ErrorOut, 409)
    @document_response(ErrorOut, 422)
    async def create_batch() -> Response:
        """Submit 1 to 1,000 tasks at once, all or nothing; a 422 names the bad item's index.
        Items may carry their own idempotency_key: `created` says, per item, whether it made a
        task or found the one its key made before."""
        data = await body()  # read first: answering with the body unread can hang the connection's next request
        if request.headers.get(IDEMPOTENCY_HEADER) is not None:
            raise ApiError(422, "invalid_request",
                           f"the {IDEMPOTENCY_HEADER} header is for POST /tasks; give each batch item its own "
                           "idempotency_key")
        batch = parse_body(BatchIn, data)
        tasks = []
        for index, item in enumerate(batch.tasks):
            try:
                tasks.append(new_task(item))
            except InvalidTask as exc:
                raise ApiError(422, "invalid_task", f"tasks[{index}]: {exc.message}",
                               {"index": index, "field": exc.field}) from None
        try:
            submitted = await store.submit_many(tasks)
        except IdempotencyConflict as exc:
            raise _conflict(exc) from None
        return json_response({"ids": [s.id for s in submitted], "count": len(submitted),
                              "created": [s.created for s in submitted]}, 201)

    @bp.get("/tasks/<int:task_id>")
    @document_response(TaskOut)
    @document_response(ErrorOut, 404)
    async def get_task(task_id: int) -> Response:
        """One task: its status, attempts, timestamps, progress and every attempt's error."""
        task = await store.get(task_id_in_range(task_id))
        if task is None:
            raise _not_found(task_id)
        return json_text(task_json(task))

    @bp.get("/tasks/<int:task_id>/result")
    @document_querystring(WaitQuery)
    @document_response(ResultOut)
    @document_response(ResultOut, 202)
    @document_response(ErrorOut, 404)
    async def get_result(task_id: int) -> Response:
        """The result (200) once the task is completed, or its error once it failed, was cancelled
        or expired; else its status (202). ?wait=S waits up to S seconds for it to finish."""
        wait = query(WaitQuery)
        task = await store.wait_finished(task_id_in_range(task_id), wait.wait)
        if task is None:
            raise _not_found(task_id)
        if task.status == TaskStatus.COMPLETED:
            return json_text("".join(object_parts((
                ("id", str(task.id)), ("status", dump(task.status.value)), ("result", task.result_json or "null")))))
        if task.finished:
            return json_text("".join(object_parts((
                ("id", str(task.id)), ("status", dump(task.status.value)),
                ("error", task.last_error_json or "null")))))
        return json_response({"id": task.id, "status": task.status.value}, 202)

    @bp.get("/tasks")
    @document_querystring(ListQuery)
    @document_response(TaskListOut)
    async def list_tasks() -> Response:
        """Tasks, newest first, filtered by status, task_type and queue, a page at a time (keyset cursor).

        Summaries by default: no payload, result or error history, and of the last error only its type
        and the first 500 characters of its message. With ?full=true, full tasks; such a page is cut
        short after about 8 MB of JSON (it still holds at least one task, however large) and then
        carries a next_cursor to the rest.
        """
        q = query(ListQuery)
        before: int | None = None
        if q.cursor is not None:
            if not DIGITS.fullmatch(q.cursor) or not 1 <= int(q.cursor) <= MAX_ID:
                raise ApiError(422, "invalid_query", "cursor: must be a next_cursor from an earlier page")
            before = int(q.cursor)
        status = q.status.value if q.status else None
        if q.full:
            page = await store.list_tasks(status=status, task_type=q.task_type, before_id=before,
                                          limit=q.limit, max_bytes=FULL_PAGE_BYTES, queue=q.queue)
            text = full_page_text(page)
            del page  # the rows' text is in `text` now: hold one copy, not two, while encoding
            return json_text(text)
        summaries = await store.list_summaries(status=status, task_type=q.task_type, before_id=before,
                                               limit=q.limit, queue=q.queue)
        next_cursor = str(summaries[-1].id) if len(summaries) == q.limit else None
        return json_response({"items": [summary_json(t) for t in summaries], "next_cursor": next_cursor})

    @bp.post("/tasks/<int:task_id>/cancel")
    @document_response(TaskOut)
    @document_response(ErrorOut, 404)
    @document_response(ErrorOut, 409)
    async def cancel_task(task_id: int) -> Response:
        """Cancel a task. A pending, scheduled or retrying one ends cancelled at once; a running one
        is stopped in whichever process runs it and ends cancelled (this waits up to 2 s for that;
        the task returned may still say running, with cancel_requested_at set). Cancelling a
        cancelled task answers 200 again; a completed, failed or expired one is a 409."""
        cancelled, task = await store.cancel(task_id_in_range(task_id))
        if task is None:
            raise _not_found(task_id)
        if task.status == TaskStatus.RUNNING:
            task = await store.wait_finished(task_id, CANCEL_WAIT_SECONDS) or task
        if not cancelled and task.status != TaskStatus.CANCELLED:
            raise ApiError(409, "not_cancellable", f"task {task_id} is {task.status.value}; only a pending, "
                           "scheduled, retrying or running task can be cancelled", {"status": task.status.value})
        return json_text(task_json(task))

    @bp.post("/tasks/<int:task_id>/retry")
    @document_response(TaskOut)
    @document_response(ErrorOut, 404)
    @document_response(ErrorOut, 409)
    async def retry_task(task_id: int) -> Response:
        """Run a failed, cancelled or expired task again: it is pending with max_retries more
        retries; attempt numbers keep counting and earlier errors stay. Other states: 409."""
        retried, task = await store.retry(task_id_in_range(task_id))
        if task is None:
            raise _not_found(task_id)
        if not retried:
            raise ApiError(409, "not_retryable", f"task {task_id} is {task.status.value}; only a failed, cancelled "
                           "or expired task can be retried", {"status": task.status.value})
        return json_text(task_json(task))

    @bp.post("/tasks/cancel")
    @document_request(CancelFilter)
    @document_response(CancelledOut)
    @document_response(ErrorOut, 422)
    async def cancel_tasks() -> Response:
        """Cancel every waiting or running task that matches the filter (an empty filter: all of them)."""
        f = parse_body(CancelFilter, await body())
        if f.status is not None and f.status not in CANCELLABLE:
            raise ApiError(422, "invalid_request", "status: only pending, scheduled, retrying or running tasks can "
                           "be cancelled")
        task_type, before = _text(f.task_type, "task_type"), _time(f.created_before, "created_before")
        n = await store.cancel_where(status=_value(f.status), task_type=task_type, queue=f.queue, created_before=before)
        return json_response({"cancelled": n})

    @bp.post("/tasks/retry")
    @document_request(RetryFilter)
    @document_response(RetriedOut)
    @document_response(ErrorOut, 422)
    async def retry_tasks() -> Response:
        """Retry every failed, cancelled or expired task that matches the filter (an empty filter: all of them)."""
        f = parse_body(RetryFilter, await body())
        if f.status is not None and f.status not in RETRYABLE:
            raise ApiError(422, "invalid_request", "status: only failed, cancelled or expired tasks can be retried")
        task_type, before = _text(f.task_type, "task_type"), _time(f.finished_before, "finished_before")
        n = await store.retry_where(status=_value(f.status), task_type=task_type, queue=f.queue, finished_before=before)
        return json_response({"retried": n})

    @bp.delete("/tasks/<int:task_id>")
    @document_response(ErrorOut, 404)
    async def delete_task(task_id: int) -> Response:
        """Remove a task and its history: a waiting one never runs, a running one is cancelled."""
        status = await store.delete(task_id_in_range(task_id))
        if status is None:
            raise _not_found(task_id)
        return Response("", status=204)

    return bp


def _value(status: TaskStatus | None) -> str | None:
    return None if status is None else status.value


def _text(value: str | None, field: str) -> str | None:
    if value is not None and "\x00" in value:  # PostgreSQL text cannot hold NUL
        raise ApiError(422, "invalid_request", f"{field}: must not contain the NUL character")
    return value


# The range PostgreSQL's timestamptz and the driver both take, with room to spare.
_EARLIEST = dt.datetime(1, 1, 2, tzinfo=dt.UTC)
_LATEST = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def _time(value: dt.datetime | None, field: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        utc = value.astimezone(dt.UTC)
    except OverflowError:
        utc = None
    if utc is None or not _EARLIEST <= utc <= _LATEST:
        raise ApiError(422, "invalid_request", f"{field}: out of range")
    return utc
