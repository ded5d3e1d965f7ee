"""The composition root: database -> Store -> nurseries. Every nursery in taskd
is opened here, and their nesting is the shutdown order:

    root: the Store's batching loops (outlive everything that submits or finishes)
      services: signals, heartbeats, lease rescue (cancelled last)
        work: the claim loop and the worker loops
          http: hypercorn

On SIGTERM/SIGINT: HTTP stops accepting and finishes its open requests, and at
the same moment claiming stops and the workers get SHUTDOWN_GRACE to finish what
they hold (a second signal cuts both short); what is left is cancelled; the
outcomes handed over are written, the unfinished tasks released to pending
without counting the attempt; the connections close.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import hypercorn.trio
import trio
import trio_asyncio
from hypercorn.config import Config as HypercornConfig

from taskd import db, maintenance, retention, startup
from taskd.config import Settings, redacted_url
from taskd.errors import DatabaseError
from taskd.http import create_app
from taskd.models import WorkerGauge
from taskd.registry import Registry
from taskd.store import Store
from taskd.workers import WorkerPool

log = logging.getLogger("taskd.server")

RELEASE_TIMEOUT = 10.0
STUCK_AFTER_CANCEL = 10.0


class Shutdown:
    """The first signal asks for a graceful stop; a second one for an immediate one."""

    def __init__(self) -> None:
        self.requested = trio.Event()
        self.immediate = trio.Event()

    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self.requested.is_set():
                    log.info("%s: shutting down gracefully (again to stop now)", signal.Signals(signum).name)
                    self.requested.set()
                else:
                    log.info("%s again: cancelling running tasks now", signal.Signals(signum).name)
                    self.immediate.set()

    async def stop_work(self, pool: WorkerPool, store: Store, work: trio.CancelScope, grace: float,
                        work_done: trio.Event) -> None:
        """On the first signal stop claiming; cancel what still runs once the grace is over.

        A handler that swallows trio.Cancelled cannot be stopped: past STUCK_AFTER_CANCEL
        the process writes what it has, hands back what it holds and exits, rather than
        hang until someone reaches for kill -9."""
        await self.requested.wait()
        pool.stop_claiming()
        log.info("claiming stopped; running tasks have %gs to finish", grace)
        with trio.move_on_after(grace):
            await self.immediate.wait()
        work.cancel()
        with trio.move_on_after(STUCK_AFTER_CANCEL):
            await work_done.wait()
        if not work_done.is_set():
            stuck = [a for a in pool.attempts() if a.scope is not None]
            log.error("the workers did not stop %gs after being cancelled; %d tasks still run (handlers that "
                      "swallow trio.Cancelled: %s); writing outcomes, handing back the rest, and exiting",
                      STUCK_AFTER_CANCEL, len(stuck), ", ".join(f"task {t} attempt {n}" for t, n in
                                                                 [a.key for a in stuck][:10]) or "none")
            for attempt in stuck:
                # Not handed back uncounted, or every restart would run it again for free:
                # its lease runs out, and the rescue counts a crash (and quarantines it).
                attempt.abandoned = True
            with trio.CancelScope(shield=True):
                await write_and_release(store, pool)
            os._exit(1)

    async def cut_short(self, scope: trio.CancelScope) -> None:
        """On a second signal stop waiting for open HTTP requests too."""
        await self.immediate.wait()
        scope.cancel()


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGTERM and SIGINT ignored for a bounded stretch of final cleanup: the watcher is gone
    by then, and a signal must not cut the release of held tasks short (a trio signal
    receiver would not do: it re-raises on exit what arrived while it was open)."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _sibling_note(settings: Settings) -> str:
    return f"  http processes {settings.http_workers}" if settings.http_workers > 1 else ""


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(settings: Settings, registry: Registry, url: str, *, banner: str = "") -> None:
    """Run the API and the workers until a signal; returns after a clean shutdown."""
    async with trio_asyncio.open_loop() as loop:
        db.route_loop_errors(loop)
        store = await startup.open_store(settings, url, connect=Store.open)
        try:
            await store.publish_defaults(settings, registry)  # read by the SQL function taskd.enqueue()
            await _run(store, settings, registry, url, banner)
        finally:
            with signals_ignored():
                with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                    try:
                        await store.remove_process()
                    except Exception as exc:
                        log.debug("could not remove this process's row: %s", exc)
                await store.close()


async def _run(store: Store, settings: Settings, registry: Registry, url: str, banner: str) -> None:
    gauge = WorkerGauge(size=settings.worker_pool_size)
    pool = WorkerPool(store, registry, settings, gauge)
    app = create_app(store, registry, settings, gauge)
    shutdown = Shutdown()
    config = HypercornConfig()
    config.bind = [f"fd://{settings.listen_fd}" if settings.listen_fd is not None
                   else _bind(settings.host, settings.port)]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = min(settings.shutdown_grace, 10.0)

    async with trio.open_nursery() as root:
        await root.start(store.inserts.run)
        await root.start(store.finishes.run)
        try:
            async with trio.open_nursery() as services:
                services.start_soon(shutdown.watch_signals)
                services.start_soon(pool.heartbeat_loop)
                services.start_soon(maintenance.rescue_loop, store, settings, pool.handing_back)
                services.start_soon(maintenance.expiry_loop, store)
                services.start_soon(maintenance.counts_loop, store)
                services.start_soon(retention.prune_loop, store, settings)
                services.start_soon(pool.progress_loop)
                services.start_soon(store.keep_listening)
                work_done = trio.Event()
                async with trio.open_nursery() as work:
                    services.start_soon(shutdown.stop_work, pool, store, work.cancel_scope, settings.shutdown_grace,
                                        work_done)
                    channels = pool.start_workers(work)
                    claiming = False
                    try:
                        async with trio.open_nursery() as http:
                            services.start_soon(shutdown.cut_short, http.cancel_scope)
                            binds: Any = await http.start(functools.partial(
                                hypercorn.trio.serve, app, config, shutdown_trigger=shutdown.requested.wait))
                            # Claiming starts only once HTTP serves: a start that cannot
                            # bind its port must not have taken any task.
                            if settings.worker_pool_size:
                                pool.start_claiming(work, channels)
                                claiming = True
                            api = f"http://{_bind(settings.host, settings.port)}"
                            if settings.listen_fd is None and binds:
                                api = str(binds[0])
                            print(f"taskd: API {api}  docs {api}/docs  database {redacted_url(url)}  "
                                  f"workers {settings.worker_pool_size}{banner}"
                                  f"{_sibling_note(settings)}", flush=True)
                    finally:
                        if not claiming:  # else the claim loops close them
                            for _lane, send in channels:
                                send.close()
                    log.info("HTTP stopped")
                work_done.set()
                # Outcomes are written while the heartbeat still renews their leases.
                with trio.CancelScope(shield=True):
                    await write_and_release(store, pool)
                services.cancel_scope.cancel()
        finally:
            # Whatever ended the process short of kill -9 (a bind failure, a crash in
            # any nursery, a second signal): write what it has, release what it holds;
            # a signal now (the watcher is gone) must not cut that short.
            with signals_ignored(), trio.CancelScope(shield=True):
                await write_and_release(store, pool)
            store.inserts.close()
            store.finishes.close()
    log.info("stopped cleanly; %s", pool_counters(pool, store))


async def write_and_release(store: Store, pool: WorkerPool) -> None:
    """Write the outcomes handed over, then hand back to the queue, without counting the
    attempt, every task claimed and not finished. Bounded: with the database away, the
    tasks' leases run out and another process rescues them."""
    with trio.move_on_after(RELEASE_TIMEOUT) as flushing:
        await store.flush_outcomes()
    if flushing.cancelled_caught:
        store.stop_retrying_outcomes()
    unfinished = pool.unfinished()
    if not unfinished:
        return
    with trio.move_on_after(RELEASE_TIMEOUT):
        try:
            await store.release(unfinished)
            log.info("released %d unfinished tasks to pending", len(unfinished))
        except DatabaseError as exc:
            log.warning("could not release %d unfinished tasks (their leases will run out and they will be "
                        "rescued): %s", len(unfinished), exc)


def pool_counters(pool: WorkerPool, store: Store) -> str:
    """Per-stage batching counters: how many rows each round trip carried."""
    return (f"claimed {pool.claimed} tasks in {pool.claims} statements, inserted {store.inserts.items} in "
            f"{store.inserts.batches}, wrote {store.finishes.items} outcomes in {store.finishes.batches}")
