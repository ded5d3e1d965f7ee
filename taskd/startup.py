"""Start-up: open the store, waiting for the database with WAIT_FOR_DB, and stop
cleanly when SIGTERM or SIGINT arrives before taskd is serving.

The wait is told in the log once, then in reminders at growing intervals (5 s,
10 s, 20 s, ... up to 5 minutes), then in one line when connected; the URL is
always the redacted one. Imports taskd.config and taskd.errors; the function
that connects (Store.open) is passed in.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Iterator
from types import FrameType
from typing import Protocol, TypeVar

import trio

from taskd.config import Settings, redacted_url
from taskd.errors import DatabaseError, DatabaseUnavailable, StartupCancelled

log = logging.getLogger("taskd.startup")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RETRY_FIRST = 0.5  # seconds between connection attempts, doubling ...
RETRY_MAX = 5.0  # ... up to this, so a database that comes back is found within seconds
FIRST_REMINDER = 5.0
MAX_REMINDER = 300.0
CLOSE_TIMEOUT = 10.0


class Closeable(Protocol):
    async def close(self) -> None: ...


StoreT = TypeVar("StoreT", bound=Closeable)
StoreT_co = TypeVar("StoreT_co", bound=Closeable, covariant=True)


class Connect(Protocol[StoreT_co]):
    """Store.open's shape: connect, migrate and return something to close."""

    def __call__(self, url: str, *, pool_size: int) -> Awaitable[StoreT_co]: ...


class WaitLog:
    """The wait for the database in the log: one warning, reminders at growing intervals, one line at the end."""

    def __init__(self, shown_url: str) -> None:
        self.shown_url = shown_url
        self.started: float | None = None
        self._next_reminder = 0.0
        self._interval = FIRST_REMINDER

    @property
    def waiting(self) -> bool:
        return self.started is not None

    def failed(self, now: float, reason: object) -> None:
        """An attempt found the database unreachable."""
        if self.started is None:
            self.started = now
            self._next_reminder = now + self._interval
            log.warning("waiting for the database at %s: %s", self.shown_url, reason)
        elif now >= self._next_reminder:
            self._interval = min(2 * self._interval, MAX_REMINDER)
            self._next_reminder = now + self._interval
            log.warning("still waiting for the database at %s (%s so far): %s",
                        self.shown_url, _duration(now - self.started), reason)

    def connected(self, now: float) -> None:
        """An attempt succeeded; says so only if there was a wait to end."""
        if self.started is not None:
            log.info("connected to the database at %s after %s", self.shown_url, _duration(now - self.started))


def _duration(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s" if whole >= 60 else f"{whole} s"


async def open_store(settings: Settings, url: str, *, connect: Connect[StoreT]) -> StoreT:
    """Connect with `connect(url, pool_size=...)`; with WAIT_FOR_DB retry while the database is unreachable.

    A SIGTERM or SIGINT meanwhile stops the attempt or the wait at once and raises StartupCancelled."""
    wait_log = WaitLog(redacted_url(url))
    store: StoreT | None = None
    with trio.CancelScope() as scope, _cancelled_by_signals(scope) as received:
        try:
            store = await _connect_waiting(settings, url, connect, wait_log)
        except DatabaseError:
            if not received:
                raise
            # A failure after the signal is the cancelled attempt's own; the stop is the news.
    if received:
        if store is not None:  # the signal came as the connection was made: still a stop
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await store.close()
        doing = "waiting for" if wait_log.waiting else "connecting to"
        raise StartupCancelled(f"stopped by {signal.Signals(received[0]).name} while {doing} the database")
    # Only a signal cancels this scope, and received is filled before it is cancelled.
    assert store is not None
    wait_log.connected(trio.current_time())
    return store


async def _connect_waiting(settings: Settings, url: str, connect: Connect[StoreT], wait_log: WaitLog) -> StoreT:
    delay = RETRY_FIRST
    while True:
        try:
            return await connect(url, pool_size=settings.db_pool_size)
        except DatabaseUnavailable as exc:
            if not settings.wait_for_db:
                raise
            wait_log.failed(trio.current_time(), exc)
        await trio.sleep(delay)
        delay = min(2 * delay, RETRY_MAX)


@contextlib.contextmanager
def _cancelled_by_signals(scope: trio.CancelScope) -> Iterator[list[int]]:
    """While open, SIGTERM and SIGINT are recorded and cancel `scope` instead of doing what they usually do.

    Not trio.open_signal_receiver: reading it needs a second task, and tasks are
    started only in server.py; between attempts alone, a connect hung until its
    timeout would hold a stop for seconds. TrioToken.run_sync_soon is safe to
    call from a signal handler and wakes the run loop, so a signal cancels even
    an attempt in progress. The previous handlers (trio's for SIGINT) come back
    on exit."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread may handle signals; whoever runs taskd elsewhere owns them
        return
    token = trio.lowlevel.current_trio_token()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        token.run_sync_soon(scope.cancel)

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
