"""Task types and their handlers: the @task decorator and the registry it fills.

A handler is `async def handler(payload, ctx)` or a plain `def` (run in a worker
thread); its return value, any JSON value, is the task's result.
Imports taskd.config, taskd.models, taskd.errors and taskd.jsontext.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import inspect
import logging
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


class TaskContext:
    """What a handler knows about the attempt it runs in: task_id, task_type, attempt
    (1-based), max_retries, and a logger that tags its records with the task id."""

    __slots__ = ("task_id", "task_type", "attempt", "max_retries", "_logger")

    def __init__(self, task_id: int, task_type: str, attempt: int, max_retries: int) -> None:
        self.task_id = task_id
        self.task_type = task_type
        self.attempt = attempt
        self.max_retries = max_retries
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

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


def _is_priority(value: object) -> bool:
    return type(value) is int and PRIORITY_RANGE[0] <= value <= PRIORITY_RANGE[1]


class Registry:
    """Task type name -> handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(
        self, name: str, fn: Callable[..., Any], *, timeout: float | None = None, max_retries: int | None = None,
        priority: int | None = None, validate: Callable[[Any], None] | None = None,
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
        existing = self._handlers.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"task type {name!r} is already registered to {existing.fn.__qualname__}")
        handler = Handler(name, fn, inspect.iscoroutinefunction(fn), timeout, max_retries, priority, validate)
        self._handlers[name] = handler
        return handler

    def task(
        self, name: str | None = None, *, timeout: float | None = None, max_retries: int | None = None,
        priority: int | None = None, validate: Callable[[Any], None] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register the function as the handler of task type `name` (default: its name);
        its limits and priority are the defaults a submitted task may override, and `validate(payload)`
        (raising ValueError) refuses a bad payload at submit time with a 422."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name or fn.__name__, fn, timeout=timeout, max_retries=max_retries, priority=priority,
                          validate=validate)
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
        if run_at is not None and delay_seconds is not None:
            raise InvalidTask("give run_at or delay_seconds, not both", field="run_at")
        if run_at is not None:
            if not isinstance(run_at, dt.datetime) or run_at.utcoffset() is None:
                raise InvalidTask("run_at must be a time with a UTC offset (RFC 3339)", field="run_at")
            try:
                run_at = run_at.astimezone(dt.UTC)
            except OverflowError:
                raise InvalidTask("run_at is out of range", field="run_at") from None
        if delay_seconds is not None and (isinstance(delay_seconds, bool) or not isinstance(delay_seconds, int | float)
                                          or not 0 <= delay_seconds <= MAX_DELAY_SECONDS):
            raise InvalidTask(f"delay_seconds must be from 0 to {MAX_DELAY_SECONDS}", field="delay_seconds")
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
        if max_retries is None:
            max_retries = handler.max_retries if handler.max_retries is not None else settings.max_retries
        if timeout_seconds is None:
            timeout_seconds = handler.timeout if handler.timeout is not None else settings.task_timeout
        if priority is None:
            priority = handler.priority if handler.priority is not None else 0
        return NewTask(task_type, payload_json, max_retries, float(timeout_seconds), priority, run_at,
                       None if delay_seconds is None else float(delay_seconds))


default_registry = Registry()
task = default_registry.task
