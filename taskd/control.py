"""What a handler raises to steer its task rather than fail an attempt. Imports nothing from taskd.

    raise taskd.Fail("bad input")     # failed at once: retrying cannot help
    raise taskd.Retry(after=30)       # run again in 30 s; not a failure, no retry spent
"""

from __future__ import annotations

MAX_DELAY_SECONDS = 31_536_000  # a year: the furthest a task can be put off, by a submit or a snooze


class Fail(Exception):
    """End the task `failed` now, without its remaining retries."""


class Retry(Exception):
    """Snooze: run the task again after `after` seconds, without counting this attempt as a failure."""

    def __init__(self, after: float = 0.0, message: str = "") -> None:
        if isinstance(after, bool) or not isinstance(after, int | float) or not 0 <= after <= MAX_DELAY_SECONDS:
            raise ValueError(f"Retry(after=...) takes 0 to {MAX_DELAY_SECONDS} seconds, not {after!r}")
        super().__init__(message or f"retry in {after:g}s")
        self.after = float(after)


def steering(exc: BaseException, limit: int = 1000) -> Fail | Retry | None:
    """The Fail or Retry a handler raised, found also inside exception groups (trio wraps
    what a nursery's child raises): a Fail anywhere wins; a group of nothing but Retry is a
    snooze (the longest of them); anything else is a failure. The walk is bounded, as a
    handler's groups may nest thousands deep."""
    pending, seen, retry, other = [exc], 0, None, False
    while pending:
        current = pending.pop()
        seen += 1
        if seen > limit:
            return None
        if isinstance(current, Fail):
            return current
        if isinstance(current, BaseExceptionGroup):
            try:
                members = tuple(current.exceptions)
            except Exception:  # a subclass may break anything; then it steers nothing
                return None
            pending.extend(m for m in members if isinstance(m, BaseException))
        elif isinstance(current, Retry):
            retry = current if retry is None or current.after > retry.after else retry
        else:
            other = True
    return None if other else retry
