"""How a failed attempt is described for storage, whatever failed.

A handler may raise anything: an exception group, a BaseException, an exception
whose __str__ raises or holds text jsonb refuses (NUL, lone surrogates). What is
kept is always a plain JSON object of storable text; describing never raises.
Imports taskd.models and taskd.jsontext.
"""

from __future__ import annotations

import traceback
from typing import Any

import trio

from taskd import jsontext
from taskd.models import attempt_error

TRACEBACK_CHARS = 2000
MESSAGE_CHARS = 2000
GROUP_MEMBERS = 5
GROUP_DEPTH = 3


class AttemptTimeout(Exception):
    """The attempt ran longer than its timeout."""


class ResultNotJSON(TypeError):
    """The handler returned something that cannot be stored as JSON."""


class PayloadUnreadable(ValueError):
    """The task's stored payload cannot be decoded (written by another producer)."""


class Crashed(Exception):
    """The attempt's quarantine process died without reporting an outcome."""


def _safe(call: Any, fallback: str) -> str:
    try:
        text = call()
        if not isinstance(text, str):
            text = fallback
    except BaseException as exc:  # noqa: BLE001  (describing must never raise, whatever __str__ does)
        if isinstance(exc, trio.Cancelled):
            raise
        text = fallback
    return jsontext.storable(text)


def members(group: BaseExceptionGroup[BaseException]) -> tuple[BaseException, ...]:
    """A group's members, or none if reading them fails (a subclass may override anything)."""
    try:
        found = tuple(group.exceptions)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, trio.Cancelled):
            raise
        return ()
    return tuple(e for e in found if isinstance(e, BaseException))


def error_type(exc: BaseException) -> str:
    return _safe(lambda: type(exc).__qualname__, "<unnamed exception>")


def error_message(exc: BaseException) -> str:
    """The exception's message; for a group, a bounded summary of its members (a group
    may nest thousands deep, or hold one instance many times over)."""
    if not isinstance(exc, BaseExceptionGroup):
        return _safe(lambda: str(exc), f"<unprintable {error_type(exc)}>")[:MESSAGE_CHARS]
    budget = [GROUP_MEMBERS * 4]

    def summary(group: BaseExceptionGroup[BaseException], depth: int) -> str:
        parts = []
        inside = members(group)
        for member in inside[:GROUP_MEMBERS]:
            if budget[0] <= 0:
                break
            budget[0] -= 1
            if isinstance(member, BaseExceptionGroup):
                inner = summary(member, depth + 1) if depth < GROUP_DEPTH else "[...]"
                parts.append(f"{error_type(member)} {inner}")
            else:
                parts.append(f"{error_type(member)}: {error_message(member)[:200]}")
        if len(inside) > len(parts):
            parts.append(f"and {len(inside) - len(parts)} more")
        return f"[{'; '.join(parts)}]"

    head = _safe(lambda: exc.message, "")
    try:
        return f"{head} {summary(exc, 1)}"[:MESSAGE_CHARS]
    except RecursionError:
        return head[:MESSAGE_CHARS]


def error_traceback(exc: BaseException) -> str:
    """The last frames and the exception's line, and its cause in one line. Never Python's
    whole formatter: it walks every cause, context and group member (recursively, and
    for a group holding one instance many times, exponentially) on the event loop."""
    frames = _safe(lambda: "".join(traceback.format_tb(exc.__traceback__, limit=-8)), "")
    tb = f"Traceback (most recent call last):\n{frames}{error_type(exc)}: {error_message(exc)}\n"
    try:
        cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    except BaseException as err:  # noqa: BLE001  (an attribute a subclass made a property)
        if isinstance(err, trio.Cancelled):
            raise
        cause = None
    if isinstance(cause, BaseException):
        tb += f"(caused by {error_type(cause)}: {error_message(cause)[:500]})\n"
    return jsontext.storable(tb)[-TRACEBACK_CHARS:]


def describe_error(exc: BaseException, attempt: int) -> dict[str, Any]:
    """What is kept of a failed attempt: type, message and the tail of the traceback."""
    return attempt_error(error_type(exc), error_message(exc), attempt, error_traceback(exc))


def describe_json(exc: BaseException, attempt: int) -> str:
    """describe_error as JSON text jsonb accepts."""
    return jsontext.dumps(describe_error(exc, attempt))


def encode_result(result: Any) -> str:
    """The handler's return value as JSON text, or ResultNotJSON."""
    try:
        return jsontext.dumps(result)
    except jsontext.NotJsonError as exc:
        kind = _safe(lambda: type(result).__qualname__, "?")
        raise ResultNotJSON(f"result of type {kind} is not JSON-serialisable: {exc}") from None


def decode_payload(payload_json: str) -> Any:
    """The stored payload, or PayloadUnreadable."""
    try:
        return jsontext.loads(payload_json)
    except (ValueError, RecursionError, MemoryError) as exc:
        raise PayloadUnreadable(f"the stored payload cannot be decoded: {type(exc).__name__}: "
                                f"{str(exc)[:200]}") from None
