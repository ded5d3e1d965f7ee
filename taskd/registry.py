"""Task types and their handlers: the @task decorator and the registry it fills.

A handler is `async def handler(payload, ctx)` or a plain `def` (run in a worker
thread); its return value, any JSON value, is the task's result.
Imports taskd.config, taskd.models, taskd.errors and taskd.jsontext.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import functools
import hashlib
import inspect
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from taskd import jsontext
from taskd.config import Settings
from taskd.control import MAX_DELAY_SECONDS
from taskd.errors import InvalidTask
from taskd.models import NewTask

MAX_TIMEOUT = 7 * 86_400.0
MAX_RETRIES_LIMIT = 1000
MAX_TYPE_CHARS = 200
PRIORITY_RANGE = (-100, 100)
QUEUE_NAME = re.compile(r"[a-z0-9_.-]{1,64}")
QUEUE_RULE = "1 to 64 of a-z, 0-9, '_', '.' and '-'"
MAX_KEY_CHARS = 200
MAX_PROGRESS_MESSAGE = 1000


def is_queue_name(value: object) -> bool:
    return isinstance(value, str) and QUEUE_NAME.fullmatch(value) is not None


class _Done:
    """What ctx.progress returns: awaitable (async handlers await it) and already done
    (a plain-def handler in its thread just calls it)."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


_DONE = _Done()


class TaskContext:
    """What a handler knows about the attempt it runs in: task_id, task_type, attempt
    (1-based), max_retries, and a logger that tags its records with the task id; and
    what it may tell: progress(fraction, message), and whether it was cancelled()."""

    __slots__ = ("task_id", "task_type", "attempt", "max_retries", "_logger", "_cancelled", "_progress")

    def __init__(self, task_id: int, task_type: str, attempt: int, max_retries: int) -> None:
        self.task_id = task_id
        self.task_type = task_type
        self.attempt = attempt
        self.max_retries = max_retries
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._cancelled = False
        self._progress: str | None = None  # the latest, as JSON text; the worker stores it

    def cancelled(self) -> bool:
        """Was this task cancelled (or deleted) while it runs? An async handler is cancelled
        by trio and need not ask; a plain-def handler's thread cannot be interrupted, so a
        long one should ask now and then and return early."""
        return self._cancelled

    def mark_cancelled(self) -> None:
        self._cancelled = True

    def progress(self, fraction: float, message: str = "") -> _Done:
        """Report how far the attempt got: `fraction` from 0 to 1 and a short message. Shown as
        the task's progress; written at most once a second (the latest wins). Await it from an
        async handler; call it from a plain-def one (it is thread-safe)."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise ValueError(f"progress takes a fraction from 0 to 1, not {fraction!r}")
        if not isinstance(message, str):
            raise ValueError("progress message must be a string")
        text = jsontext.dumps({
            "fraction": float(fraction),
            "message": jsontext.storable(message[:MAX_PROGRESS_MESSAGE]),
            "updated_at": dt.datetime.now(dt.UTC).isoformat(),
        })
        # One reference assignment: atomic under the GIL, so a handler thread and the
        # trio thread reading it need no lock.
        self._progress = text
        return _DONE

    def latest_progress(self) -> str | None:
        """The latest progress reported (JSON text), if any; the worker stores it."""
        return self._progress

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        # Made on first use: most handlers never log, and this runs once per task.
        if self._logger is None:
            self._logger = logging.LoggerAdapter(_task_logger(self.task_type), {"task_id": self.task_id})
        return self._logger

    def __repr__(self) -> str:
        return f"TaskContext(task_id={self.task_id}, task_type={self.task_type!r}, attempt={self.attempt})"


@functools.cache
def _task_logger(task_type: str) -> logging.Logger:
    return logging.getLogger(f"taskd.task.{task_type}")


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    timeout: float | None = None
    max_retries: int | None = None
    priority: int | None = None
    # Checks a payload at submit time; raises ValueError with what is wrong.
    validate: Callable[[Any], None] | None = None
    queue: str | None = None
    unique_for: float | None = None  # seconds: the same type and payload is queued once per window


def _is_priority(value: object) -> bool:
    return type(value) is int and PRIORITY_RANGE[0] <= value <= PRIORITY_RANGE[1]


class Registry:
    """Task type name -> handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(
        self, name: str, fn: Callable[..., Any], *, timeout: float | None = None, max_retries: int | None = None,
        priority: int | None = None, validate: Callable[[Any], None] | None = None, queue: str | None = None,
        unique_for: float | None = None,
    ) -> Handler:
        if not name or not isinstance(name, str):
            raise ValueError("a task type needs a non-empty name")
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"task {name!r}: timeout must be > 0 and <= {MAX_TIMEOUT:g} seconds")
        if max_retries is not None and not 0 <= max_retries <= MAX_RETRIES_LIMIT:
            raise ValueError(f"task {name!r}: max_retries must be between 0 and {MAX_RETRIES_LIMIT}")
        if priority is not None and not _is_priority(priority):
            raise ValueError(f"task {name!r}: priority must be a whole number from {PRIORITY_RANGE[0]} to "
                             f"{PRIORITY_RANGE[1]}")
        if queue is not None and not is_queue_name(queue):
            raise ValueError(f"task {name!r}: queue must be {QUEUE_RULE}")
        if unique_for is not None and (isinstance(unique_for, bool) or not isinstance(unique_for, int | float)
                                       or not 0 < unique_for <= MAX_DELAY_SECONDS):
            raise ValueError(f"task {name!r}: unique_for must be > 0 and <= {MAX_DELAY_SECONDS} seconds")
        existing = self._handlers.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"task type {name!r} is already registered to {existing.fn.__qualname__}")
        handler = Handler(name, fn, inspect.iscoroutinefunction(fn), timeout, max_retries, priority, validate,
                          queue, None if unique_for is None else float(unique_for))
        self._handlers[name] = handler
        return handler

    def task(
        self, name: str | None = None, *, timeout: float | None = None, max_retries: int | None = None,
        priority: int | None = None, validate: Callable[[Any], None] | None = None, queue: str | None = None,
        unique_for: float | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register the function as the handler of task type `name` (default: its name);
        its limits, priority and queue are the defaults a submitted task may override, and
        `validate(payload)` (raising ValueError) refuses a bad payload at submit time with a 422.
        With `unique_for=SECONDS`, a task of this type with the same payload is queued once per
        window of that many seconds: a repeat gets the task already made (unless it gives its own
        idempotency key)."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name or fn.__name__, fn, timeout=timeout, max_retries=max_retries, priority=priority,
                          validate=validate, queue=queue, unique_for=unique_for)
            return fn

        return decorate

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def __iter__(self) -> Iterator[Handler]:
        return iter(self._handlers.values())

    def new_task(
        self,
        settings: Settings,
        task_type: str,
        payload: Any,
        *,
        max_retries: int | None = None,
        timeout_seconds: float | None = None,
        priority: int | None = None,
        run_at: dt.datetime | None = None,
        delay_seconds: float | None = None,
        queue: str | None = None,
        expires_at: dt.datetime | None = None,
        expires_in_seconds: float | None = None,
        idempotency_key: str | None = None,
    ) -> NewTask:
        """Check a submitted task against the registry and resolve its defaults (task, then
        handler, then settings). The one rule for every way in: the HTTP API and taskd.enqueue."""
        if not isinstance(task_type, str) or not 1 <= len(task_type) <= MAX_TYPE_CHARS:
            raise InvalidTask(f"task_type must be a string of 1 to {MAX_TYPE_CHARS} characters", field="task_type")
        if not isinstance(payload, dict):
            raise InvalidTask(f"payload must be a JSON object, not {type(payload).__name__}", field="payload")
        if max_retries is not None and (type(max_retries) is not int or not 0 <= max_retries <= MAX_RETRIES_LIMIT):
            raise InvalidTask(f"max_retries must be a whole number from 0 to {MAX_RETRIES_LIMIT}", field="max_retries")
        if timeout_seconds is not None and (
                isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, int | float)
                or not 0 < timeout_seconds <= MAX_TIMEOUT):
            raise InvalidTask(f"timeout_seconds must be > 0 and <= {MAX_TIMEOUT:g}", field="timeout_seconds")
        if priority is not None and not _is_priority(priority):
            raise InvalidTask(f"priority must be a whole number from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}",
                              field="priority")
        if not (run_at is None and delay_seconds is None and queue is None and expires_at is None
                and expires_in_seconds is None and idempotency_key is None):
            # Apart, so the common submit (none of these) pays for none of their checks.
            run_at, expires_at = _check_steering(run_at, delay_seconds, queue, expires_at, expires_in_seconds,
                                                 idempotency_key)
        handler = self._handlers.get(task_type)
        if handler is None:
            known = ", ".join(self.names()) or "none"
            raise InvalidTask(f"unknown task_type {task_type!r}; known types: {known}", field="task_type")
        try:
            payload_json = jsontext.dumps(payload)
        except jsontext.NotJsonError as exc:
            raise InvalidTask(f"payload cannot be stored as JSON: {exc}", field="payload") from None
        if handler.validate is not None:
            try:
                handler.validate(payload)
            except ValueError as exc:
                raise InvalidTask(f"payload does not fit {task_type}: {exc}", field="payload") from None
        request_hash = None
        if idempotency_key is not None:
            # The request as given (before defaults, which may change between releases).
            request_hash = _digest({
                "task_type": task_type, "payload": payload, "max_retries": max_retries,
                "timeout_seconds": timeout_seconds, "priority": priority, "queue": queue,
                "run_at": None if run_at is None else run_at.isoformat(), "delay_seconds": delay_seconds,
                "expires_at": None if expires_at is None else expires_at.isoformat(),
                "expires_in_seconds": expires_in_seconds,
            })
        elif handler.unique_for is not None:
            idempotency_key = unique_key(task_type, payload_json, handler.unique_for, time.time())
            request_hash = "unique_for"  # any repeat within the window is the same job
        if max_retries is None:
            max_retries = handler.max_retries if handler.max_retries is not None else settings.max_retries
        if timeout_seconds is None:
            timeout_seconds = handler.timeout if handler.timeout is not None else settings.task_timeout
        if priority is None:
            priority = handler.priority if handler.priority is not None else 0
        if queue is None:
            queue = handler.queue or "default"
        return NewTask(task_type, payload_json, max_retries, float(timeout_seconds), priority, run_at,
                       None if delay_seconds is None else float(delay_seconds), queue, expires_at,
                       None if expires_in_seconds is None else float(expires_in_seconds), idempotency_key,
                       request_hash)


def _check_steering(run_at: Any, delay_seconds: Any, queue: Any, expires_at: Any, expires_in_seconds: Any,
                    idempotency_key: Any) -> tuple[dt.datetime | None, dt.datetime | None]:
    """Check the options that steer a task; run_at and expires_at in UTC."""
    if run_at is not None and delay_seconds is not None:
        raise InvalidTask("give run_at or delay_seconds, not both", field="run_at")
    run_at = _utc(run_at, "run_at")
    if delay_seconds is not None and not _seconds_in(delay_seconds, 0, MAX_DELAY_SECONDS):
        raise InvalidTask(f"delay_seconds must be from 0 to {MAX_DELAY_SECONDS}", field="delay_seconds")
    if queue is not None and not is_queue_name(queue):
        raise InvalidTask(f"queue must be {QUEUE_RULE}", field="queue")
    if expires_at is not None and expires_in_seconds is not None:
        raise InvalidTask("give expires_at or expires_in_seconds, not both", field="expires_at")
    expires_at = _utc(expires_at, "expires_at")
    if expires_in_seconds is not None and not _seconds_in(expires_in_seconds, 0, MAX_DELAY_SECONDS, low_open=True):
        raise InvalidTask(f"expires_in_seconds must be > 0 and <= {MAX_DELAY_SECONDS}", field="expires_in_seconds")
    _check_expiry(run_at, delay_seconds, expires_at, expires_in_seconds)
    if idempotency_key is not None and (not isinstance(idempotency_key, str)
                                        or not 1 <= len(idempotency_key) <= MAX_KEY_CHARS
                                        or "\x00" in idempotency_key):
        raise InvalidTask(f"idempotency_key must be 1 to {MAX_KEY_CHARS} characters (no NUL)",
                          field="idempotency_key")
    return run_at, expires_at


def _utc(value: Any, field: str) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime) or value.utcoffset() is None:
        raise InvalidTask(f"{field} must be a time with a UTC offset (RFC 3339)", field=field)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise InvalidTask(f"{field} is out of range", field=field) from None


def _seconds_in(value: Any, low: float, high: float, *, low_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (low < value if low_open else low <= value) and value <= high


def _check_expiry(run_at: dt.datetime | None, delay: float | None, expires_at: dt.datetime | None,
                  expires_in: float | None) -> None:
    """An expiry must leave the task a chance to run: after its start time, and not past."""
    if expires_at is None and expires_in is None:
        return
    now = dt.datetime.now(dt.UTC)
    start = run_at or now + dt.timedelta(seconds=delay or 0)
    try:
        deadline = expires_at or now + dt.timedelta(seconds=expires_in or 0)
    except OverflowError:
        raise InvalidTask("expires_at is out of range", field="expires_at") from None
    if expires_at is not None and expires_at <= now:
        raise InvalidTask("expires_at is in the past", field="expires_at")
    if deadline <= start:
        raise InvalidTask("the task would expire before it may start (expiry not after run_at / delay_seconds)",
                          field="expires_at" if expires_at is not None else "expires_in_seconds")


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def unique_key(task_type: str, payload_json: str, unique_for: float, now: float) -> str:
    """The idempotency key unique_for derives: type, payload and window (`now` in Unix seconds).

    The SQL function taskd.enqueue derives the same key (taskd.unique_key, migration 0006)
    from the sha256 of `jsonb_build_object('payload', payload, 'task_type', type)::text`;
    this writes that text as PostgreSQL would, so either way in finds the other's task."""
    text = _jsonb_text({"payload": json.loads(payload_json, parse_float=decimal.Decimal), "task_type": task_type})
    return f"unique:{int(now // unique_for)}:{hashlib.sha256(text.encode()).hexdigest()}"


# PostgreSQL's escape_json: the short escapes, \u00XX below space, everything else as it is.
_JSONB_ESCAPES = {**{c: f"\\u{c:04x}" for c in range(0x20)}, 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n",
                  0x0D: "\\r", 0x09: "\\t", 0x22: '\\"', 0x5C: "\\\\"}


def _jsonb_text(value: Any) -> str:
    """A JSON value as jsonb prints it: keys shortest first, then by their UTF-8 bytes;
    ", " and ": " between; numbers as numeric prints them (1e2 as 100, 1.50 as 1.50)."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{_jsonb_text(k)}: {_jsonb_text(value[k])}" for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_jsonb_text(item) for item in value) + "]"
    if isinstance(value, str):
        return '"' + value.translate(_JSONB_ESCAPES) + '"'
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, decimal.Decimal):
        # numeric keeps the digits after the point that the text had, less the exponent.
        return format(abs(value) if value.is_zero() else value, "f")
    return str(value)


default_registry = Registry()
task = default_registry.task
