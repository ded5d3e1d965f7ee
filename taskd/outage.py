"""One account of a database outage for the whole process, in the log.

Every loop (claimer, outcome writer, heartbeat, listener, rescue) and every HTTP
request meets the same outage; each reporting it would make dozens of warnings a
minute. Here the first failure logs one warning, later ones only a reminder at
growing intervals, and the first success after it one line with the outage's
length. A failure soon after a recovery is one more connection learning that
the server went away (each notices on its next use), not a new outage.
Imports nothing from taskd.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("taskd.database")

FIRST_REMINDER = 5.0
MAX_REMINDER = 300.0
SETTLE = 5.0  # a failure this soon after a recovery is announced only if it...
PERSISTS = 1.0  # ...goes on this long


class OutageLog:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started: float | None = None  # when the current outage began
        self._next_reminder = 0.0
        self._interval = FIRST_REMINDER
        self._recovered_at = -SETTLE
        self._announced = False
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.started is not None

    def failed(self, where: str, reason: object) -> None:
        """A statement or connection failed because the database is unavailable."""
        now = self._clock()
        if self.started is None:
            self.started = now
            self._interval = FIRST_REMINDER
            self._next_reminder = now + self._interval
            self._announced = now - self._recovered_at >= SETTLE
            if self._announced:
                self._announce(where, reason)
            else:
                log.debug("database unavailable again (%s: %s)", where, reason)
            return
        if not self._announced:
            if now - self.started >= PERSISTS:  # not one stale connection: a new outage
                self._announce(where, reason)
            return
        if now >= self._next_reminder:
            log.warning("database still unavailable after %.0fs (%s: %s)", now - self.started, where, reason)
            self._interval = min(self._interval * 2, MAX_REMINDER)
            self._next_reminder = now + self._interval

    def _announce(self, where: str, reason: object) -> None:
        self._announced = True
        self.outages += 1
        log.warning("database unavailable (%s: %s); retrying, and serving 503 meanwhile", where, reason)

    def succeeded(self) -> None:
        """A statement went through."""
        if self.started is None:
            return
        now = self._clock()
        if self._announced:
            log.warning("database reachable again after %.1fs", now - self.started)
        self.started = None
        self._recovered_at = now
