"""The HTTP API: JSON in -> Store -> JSON out. No nursery of its own.

One blueprint per resource (tasks, queues, stats); this module makes the app, its
OpenAPI documents and the error handlers they share. Every error, including bad input
the framework itself rejects, is `{"error": {"code", "message", "details"}}` with the
right 4xx; nothing is written for a rejected request.
Imports taskd.http.*, taskd.store, taskd.registry, taskd.config, taskd.models, taskd.errors,
taskd.coalescer.
"""

from __future__ import annotations

import logging

from quart import Response, request
from quart_schema import QuartSchema
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from taskd.coalescer import CoalescerClosed
from taskd.config import Settings
from taskd.errors import DatabaseError, DatabaseUnavailable, InvalidTask
from taskd.http.common import ApiError, error_response
from taskd.http.queues import queues_blueprint
from taskd.http.stats import stats_blueprint
from taskd.http.tasks import tasks_blueprint
from taskd.models import WorkerGauge
from taskd.registry import Registry
from taskd.store import Store

log = logging.getLogger("taskd.http")


def create_app(store: Store, registry: Registry, settings: Settings, gauge: WorkerGauge) -> QuartTrio:
    """The Quart-Trio app serving the REST API and its OpenAPI documents."""
    app = QuartTrio("taskd")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    QuartSchema(
        app,
        info={"title": "taskd", "version": "0.1.0",
              "description": "A PostgreSQL-backed task queue: submit tasks, steer them (queues, priorities, "
                             "schedules, cancel, retry), watch them run, read results."},
        redoc_ui_path="/redoc",
        scalar_ui_path=None,
    )
    app.register_blueprint(tasks_blueprint(store, registry, settings))
    app.register_blueprint(queues_blueprint(store))
    app.register_blueprint(stats_blueprint(store, settings, gauge))

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

    return app
