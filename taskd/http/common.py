"""What every route module shares: the JSON error shape, reading a JSON body or query,
and tasks as JSON text. Imports taskd.models and taskd.schemas.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from pydantic import ValidationError
from quart import Response, request

from taskd.models import Task, TaskPage, TaskSummary

MAX_ID = 2**63 - 1
DIGITS = re.compile(r"[0-9]{1,19}")  # str.isdigit() also accepts '²' and other digits int() refuses
JSON_HEADERS = {"Content-Type": "application/json"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.close = close  # the body was left unread: the connection cannot be reused


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status,
                    headers={**JSON_HEADERS, **(headers or {})})


def json_text(text: str, status: int = 200) -> Response:
    return Response(text, status=status, headers=JSON_HEADERS)


def error_response(status: int, code: str, message: str, details: Any = None) -> Response:
    return json_response({"error": {"code": code, "message": message, "details": details}}, status)


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def object_parts(fields: Iterable[tuple[str, str]]) -> list[str]:
    """The pieces of a JSON object whose values are JSON text already (keys are taskd's own, plain)."""
    parts = ["{"]
    for key, value in fields:
        parts += [f'"{key}":', value, ","]
    parts[-1] = "}"
    return parts


def task_json_parts(task: Task) -> list[str]:
    """A task as pieces of JSON text: payload, result and errors are PostgreSQL's jsonb text,
    spliced in undecoded, and kept as they are (not copied) until the response is joined."""
    return object_parts((
        ("id", str(task.id)),
        ("task_type", dump(task.task_type)),
        ("status", dump(task.status.value)),
        ("queue", dump(task.queue)),
        ("payload", task.payload_json),
        ("result", task.result_json or "null"),
        ("attempts", str(task.attempts)),
        ("max_retries", str(task.max_retries)),
        ("crashes", str(task.crashes)),
        ("priority", str(task.priority)),
        ("run_at", dump(iso(task.run_at))),
        ("expires_at", dump(iso(task.expires_at))),
        ("idempotency_key", dump(task.idempotency_key)),
        ("cancel_requested_at", dump(iso(task.cancel_requested_at))),
        ("progress", task.progress_json or "null"),
        ("timeout_seconds", dump(task.timeout_seconds)),
        ("created_at", dump(iso(task.created_at))),
        ("started_at", dump(iso(task.started_at))),
        ("finished_at", dump(iso(task.finished_at))),
        ("last_error", task.last_error_json or "null"),
        ("errors", task.errors_json),
    ))


def task_json(task: Task) -> str:
    return "".join(task_json_parts(task))


def summary_json(task: TaskSummary) -> dict[str, Any]:
    return {
        "id": task.id,
        "task_type": task.task_type,
        "status": task.status.value,
        "queue": task.queue,
        "attempts": task.attempts,
        "max_retries": task.max_retries,
        "crashes": task.crashes,
        "priority": task.priority,
        "run_at": iso(task.run_at),
        "created_at": iso(task.created_at),
        "started_at": iso(task.started_at),
        "finished_at": iso(task.finished_at),
        "last_error": {"type": task.error_type, "message": task.error_message} if task.has_error else None,
    }


def full_page_text(page: TaskPage) -> str:
    parts = ['{"items":[']
    for task in page.tasks:
        parts += task_json_parts(task)
        parts.append(",")
    if page.tasks:
        parts.pop()
    cursor = None if page.next_before_id is None else str(page.next_before_id)
    parts += ['],"next_cursor":', dump(cursor), "}"]
    return "".join(parts)


def validation_details(exc: ValidationError, prefix: Sequence[str | int] = ()) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [*prefix, *err["loc"]]
        details.append({"loc": ".".join(str(part) for part in loc), "message": err["msg"], "type": err["type"]})
    return details


def raise_validation(exc: ValidationError) -> NoReturn:
    details = validation_details(exc)
    if any(d["type"] == "json_invalid" for d in details):
        raise ApiError(400, "malformed_json", "the request body is not valid JSON", details)
    first = details[0]
    where = f"{first['loc']}: " if first["loc"] else ""
    raise ApiError(422, "invalid_request", f"{where}{first['message']}", details)


async def body() -> bytes:
    """The request body, insisting on JSON (415 otherwise); over MAX_BODY_BYTES Quart raises 413."""
    # Read before judging: a response sent while the body is still unread can leave
    # hypercorn's keep-alive connection stuck, so the client's next request hangs.
    data: bytes = await request.get_data(cache=False, as_text=False)  # type: ignore[assignment]
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"send JSON with Content-Type: application/json (got {mimetype or 'none'})")
    return data


def parse_body(model: type[Any], data: bytes) -> Any:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise_validation(exc)


def task_id_in_range(task_id: int) -> int:
    if task_id < 1 or task_id > MAX_ID:
        raise ApiError(404, "not_found", f"no task with id {task_id}")
    return task_id


def query(model: type[Any]) -> Any:
    args = request.args.to_dict()
    for name, value in args.items():
        if "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise ApiError(422, "invalid_query", f"{name}: must not contain the NUL character")
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        first = validation_details(exc)[0]
        raise ApiError(422, "invalid_query", f"{first['loc']}: {first['message']}",
                       validation_details(exc)) from None
