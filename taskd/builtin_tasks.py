"""The task types every taskd process knows: echo, sleep and data_processing."""

from __future__ import annotations

import hashlib
from typing import Any

import trio

from taskd.registry import TaskContext, task

MAX_SLEEP_SECONDS = 3600


class BadPayload(ValueError):
    """The payload does not fit the task type."""


@task("echo")
async def echo(payload: Any, ctx: TaskContext) -> Any:
    """The result is the payload."""
    return payload


@task("sleep")
async def sleep(payload: Any, ctx: TaskContext) -> dict[str, float]:
    """Sleep payload.seconds (0..3600), then report how long."""
    seconds = payload.get("seconds", 1) if isinstance(payload, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise BadPayload(f"payload.seconds must be a number from 0 to {MAX_SLEEP_SECONDS}")
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


@task("data_processing")
def data_processing(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """Counts, a SHA-256 and the upper-cased text of payload.data (a string or a list of strings).

    A plain function, so it runs in a worker thread and never blocks the event loop.
    """
    data = payload.get("data") if isinstance(payload, dict) else None
    if isinstance(data, list) and all(isinstance(item, str) for item in data):
        data = "\n".join(data)
    if not isinstance(data, str):
        raise BadPayload("payload.data must be a string or a list of strings")
    return _process_text(data)
