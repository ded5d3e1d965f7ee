"""Routes for queues: list them with their counts, pause and resume one.

Imports taskd.http.common, taskd.store, taskd.registry, taskd.schemas.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response
from quart_schema import document_response

from taskd.http.common import ApiError, json_response
from taskd.registry import QUEUE_RULE, is_queue_name
from taskd.schemas import ErrorOut, QueueListOut, QueueOut
from taskd.store import Store

STATUS_COLUMNS = ("pending", "scheduled", "running", "retrying", "completed", "failed", "cancelled", "expired")


def queue_json(row: dict[str, Any]) -> dict[str, Any]:
    wait = row["oldest_wait_seconds"]
    return {
        "name": row["name"],
        "paused": row["paused"],
        "counts": {status: row[status] for status in STATUS_COLUMNS},
        "running": row["running"],
        "oldest_wait_seconds": None if wait is None else round(max(wait, 0.0), 3),
    }


def queues_blueprint(store: Store) -> Blueprint:
    bp = Blueprint("queues", __name__)

    def checked(name: str) -> str:
        if not is_queue_name(name):
            raise ApiError(422, "invalid_request", f"queue name must be {QUEUE_RULE}")
        return name

    @bp.get("/queues")
    @document_response(QueueListOut)
    async def list_queues() -> Response:
        """Every queue that holds a task or was paused: counts per status, running, how long its
        oldest due task has waited, and whether it is paused."""
        return json_response({"items": [queue_json(row) for row in await store.queues()]})

    @bp.post("/queues/<name>/pause")
    @document_response(QueueOut)
    @document_response(ErrorOut, 422)
    async def pause_queue(name: str) -> Response:
        """Stop claiming from this queue, in every process, from now on (running tasks go on;
        submissions are still accepted). A queue not used yet may be paused ahead."""
        return json_response(queue_json(await store.set_paused(checked(name), True)))

    @bp.post("/queues/<name>/resume")
    @document_response(QueueOut)
    @document_response(ErrorOut, 422)
    async def resume_queue(name: str) -> Response:
        """Claim from this queue again, in every process."""
        return json_response(queue_json(await store.set_paused(checked(name), False)))

    return bp
