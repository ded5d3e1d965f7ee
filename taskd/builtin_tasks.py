"""The task types every taskd process knows: echo, sleep and data_processing."""

from __future__ import annotations

import hashlib
from typing import Any

import trio

from taskd.control import Fail
from taskd.registry import TaskContext, task

MAX_SLEEP_SECONDS = 3600


class BadPayload(ValueError):
    """The payload does not fit the task type."""


@task("echo")
async def echo(payload: Any, ctx: TaskContext) -> Any:
    """The result is the payload."""
    return payload


def _sleep_seconds(payload: Any) -> float:
    seconds = payload.get("seconds", 1) if isinstance(payload, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise BadPayload(f"payload.seconds must be a number from 0 to {MAX_SLEEP_SECONDS}")
    return seconds


def _check_sleep(payload: Any) -> None:
    _sleep_seconds(payload)


@task("sleep", validate=_check_sleep)
async def sleep(payload: Any, ctx: TaskContext) -> dict[str, float]:
    """Sleep payload.seconds (0..3600), then report how long."""
    try:
        seconds = _sleep_seconds(payload)
    except BadPayload as exc:  # written by another producer: retrying cannot help
        raise Fail(str(exc)) from None
    await trio.sleep(seconds)
    return {"slept": seconds}


def _process_text(text: str) -> dict[str, Any]:
    return {
        "characters": len(text),
        "words": len(text.split()),
        "lines": len(text.splitlines()),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "upper": text.upper(),
    }


def _text(payload: Any) -> str:
    data = payload.get("data") if isinstance(payload, dict) else None
    if isinstance(data, list) and all(isinstance(item, str) for item in data):
        data = "\n".join(data)
    if not isinstance(data, str):
        raise BadPayload("payload.data must be a string or a list of strings")
    return data


def _check_text(payload: Any) -> None:
    _text(payload)


@task("data_processing", validate=_check_text)
def data_processing(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """Counts, a SHA-256 and the upper-cased text of payload.data (a string or a list of strings).

    A plain function, so it runs in a worker thread and never blocks the event loop.
    """
    try:
        return _process_text(_text(payload))
    except BadPayload as exc:  # written by another producer: retrying cannot help
        raise Fail(str(exc)) from None
