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
