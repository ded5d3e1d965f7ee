"""Command line: flags, then the environment, then ./.env, then defaults -> Settings;
logging; task modules; the database (embedded unless DATABASE_URL); then the server.

Exit status: 0 after a clean shutdown, and after SIGTERM or SIGINT at any point of
start-up (a stop asked for is a clean stop); 1 when the database or the port cannot
be had; 2 for an invalid setting, or a database schema newer than this taskd. Errors a
user can fix are one line, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import importlib
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import trio

from taskd import builtin_tasks  # noqa: F401  (registers echo, sleep, data_processing)
from taskd.config import SETTINGS, Settings, load_settings, redacted_url
from taskd.errors import ConfigError, DatabaseError, DatabaseUnavailable, SchemaTooNew, StartupCancelled
from taskd.registry import Registry, default_registry

if TYPE_CHECKING:
    from taskd.embedded import EmbeddedDatabase

PROG = "taskd"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(2, f"{message} (see python -m taskd --help)")


def fail(status: int, message: str) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m taskd",
        description="taskd: a PostgreSQL-backed task queue server. One process serves the REST API and runs "
                    "a pool of workers. Every option may also be set by the environment variable named in "
                    "brackets, or in a .env file in the working directory; flags win, then the environment, "
                    "then .env.",
    )
    for setting in SETTINGS:
        help_text = argparse.SUPPRESS if setting.internal else f"{setting.help} [{setting.env}]"
        if setting.is_switch:
            parser.add_argument(*setting.flags, dest=setting.env, action="store_const", const="true",
                                default=None, help=help_text)
        else:
            parser.add_argument(*setting.flags, dest=setting.env, default=None, metavar="VALUE", help=help_text)
    return parser


def gather_settings(argv: Sequence[str] | None, environ: dict[str, str], cwd: pathlib.Path) -> Settings:
    """Merge the sources in precedence order and validate once: the flags over load_settings' rule."""
    args = build_parser().parse_args(argv)
    flags = {name: value for name, value in vars(args).items() if value is not None}
    return load_settings(environ, cwd, overrides=flags)


def import_task_modules(settings: Settings, registry: Registry) -> None:
    for name in settings.task_modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import failure is the user's module: report it in one line
            raise ConfigError("TASK_MODULES", f"cannot import {name!r}: {type(exc).__name__}: {exc}") from None
    if not registry.names():
        raise ConfigError("TASK_MODULES", "no task types are registered")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The libraries below narrate routine work (pgserver prints initdb's whole output);
    # keep them to warnings unless DEBUG was asked for.
    if level != "DEBUG":
        for noisy in ("asyncio", "trio_asyncio", "pgserver"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # During an outage asyncpg's pool logs a traceback each time it fails to reopen
        # its idle connections; taskd reports the outage itself, once.
        logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)


class StopSignals:
    """SIGTERM and SIGINT from the start until the server's own handling takes over, and after it.

    SIGINT keeps Python's meaning (KeyboardInterrupt; inside trio.run, trio's safe
    delivery of it), and SIGTERM is made to mean the same, so either one ends
    start-up by an exception that `main` turns into one line and status 0. While
    the embedded PostgreSQL starts they are only recorded: cutting initdb or
    pg_ctl short could leave a data folder that never starts again."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False

    @property
    def name(self) -> str:
        return signal.Signals(self.received or signal.SIGINT).name

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self._deferring:
            return
        interrupt = signal.getsignal(signal.SIGINT)
        if callable(interrupt):
            interrupt(signal.SIGINT, frame)  # Python's, or trio's inside trio.run
        else:
            raise KeyboardInterrupt  # SIGINT is ignored (nohup): still, SIGTERM asks for a stop

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum

    def install(self) -> signal.Handlers | Callable[[int, FrameType | None], object] | int | None:
        """Take SIGTERM over; returns the handler to give back."""
        return signal.signal(signal.SIGTERM, self._on_sigterm)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Record SIGTERM and SIGINT only, for the caller to act on afterwards."""
        previous = signal.signal(signal.SIGINT, self._record)
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    if threading.current_thread() is not threading.main_thread():
        _main(argv, None)  # signals are the embedding program's business there
    stop = StopSignals()
    previous = stop.install()
    try:
        _main(argv, stop)
    except KeyboardInterrupt:
        stopped(f"stopped by {stop.name} during start-up")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(argv: Sequence[str] | None, stop: StopSignals | None) -> NoReturn:
    try:
        settings = gather_settings(argv, dict(os.environ), pathlib.Path.cwd())
        configure_logging(settings.log_level)
        import_task_modules(settings, default_registry)
    except ConfigError as exc:
        fail(2, f"invalid {exc.setting}: {exc.problem}")

    from taskd import server  # after settings: a bad flag should not pay for importing the web stack

    embedded = None
    url = settings.database_url
    banner = ""
    problem: str | None = None
    problem_status = 1
    stop_message: str | None = None
    try:
        if url is None:
            embedded = start_embedded_unless_stopped(settings, stop)
            url = embedded.url
            print(f"taskd: embedded PostgreSQL in {embedded.pgdata} at {redacted_url(url)}", flush=True)
            banner = " (embedded)"
        with http_siblings(settings, url, list(sys.argv[1:] if argv is None else argv)) as settings:
            trio.run(functools.partial(server.serve, settings, default_registry, url, banner=banner))
    except* StartupCancelled as group:
        stop_message = str(_first(group))
    except* KeyboardInterrupt:
        stop_message = f"stopped by {stop.name if stop else 'SIGINT'} during start-up"
    except* SchemaTooNew as group:  # a later release's database: running, or waiting, would not fix it
        problem, problem_status = str(_first(group)), 2
    except* DatabaseUnavailable as group:
        problem = f"cannot reach the database: {_first(group)}"
    except* DatabaseError as group:
        problem = f"the database refused to start taskd: {_first(group)}"
    except* OSError as group:
        os_error = _first(group)
        if getattr(os_error, "errno", None) == errno.EADDRINUSE:
            problem = f"cannot listen on {settings.host}:{settings.port}: the address is in use"
        else:
            problem = f"{type(os_error).__name__}: {os_error}"
    finally:
        if embedded is not None:
            embedded.stop()
    if stop_message is not None:  # a stop asked for wins over what failed as it was carried out
        stopped(stop_message)
    if problem is not None:
        fail(problem_status, problem)
    raise SystemExit(0)


def stopped(message: str) -> NoReturn:
    """A stop asked for by a signal before taskd was serving: one line, status 0."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(0)


def start_embedded_unless_stopped(settings: Settings, stop: StopSignals | None) -> EmbeddedDatabase:
    """Start the embedded PostgreSQL with signals held back; one that came meanwhile stops it again."""
    from taskd.embedded import start_embedded

    if stop is None:
        return start_embedded(settings.data_dir)
    embedded = None
    with stop.deferred():
        try:
            embedded = start_embedded(settings.data_dir)
        except DatabaseUnavailable:
            # A Ctrl-C reaches initdb and pg_ctl too (one process group), which then fail.
            if stop.received is None:
                raise
    if stop.received is not None:
        if embedded is not None:
            embedded.stop()
        raise StartupCancelled(f"stopped by {stop.name} while the embedded PostgreSQL was starting")
    assert embedded is not None
    return embedded


@contextlib.contextmanager
def http_siblings(settings: Settings, url: str, argv: list[str]) -> Iterator[Settings]:
    """With --http-workers N > 1: open the listening socket here and start N-1 more
    processes serving HTTP on it (no task workers of their own); the kernel spreads
    connections between them. They are stopped when this process stops."""
    if settings.http_workers <= 1 or settings.listen_fd is not None:
        yield settings
        return
    listener = socket.create_server((settings.host, settings.port), backlog=1024,
                                    family=socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    env = {**os.environ, "DATABASE_URL": url}
    children = [
        subprocess.Popen([sys.executable, "-m", "taskd", *argv, "--workers", "0", "--http-workers", "1",
                          "--listen-fd", str(fd)], pass_fds=[fd], env=env)
        for _ in range(settings.http_workers - 1)
    ]
    try:
        yield dataclasses.replace(settings, listen_fd=fd)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(settings.shutdown_grace + 15)
            except subprocess.TimeoutExpired:
                child.kill()
        with contextlib.suppress(OSError):  # hypercorn may have closed the descriptor already
            listener.close()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
