"""Command line: flags, then the environment, then ./.env, then defaults -> Settings;
logging; task modules; the database (embedded unless DATABASE_URL); then the server.

Exit status: 0 after a clean shutdown, 1 when the database or the port cannot be
had, 2 for an invalid setting. Errors a user can fix are one line, no traceback.
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
from collections.abc import Iterator, Sequence
from typing import NoReturn

import trio

from taskd import builtin_tasks  # noqa: F401  (registers echo, sleep, data_processing)
from taskd.config import SETTINGS, Settings, parse_dotenv, parse_settings
from taskd.errors import ConfigError, DatabaseError, DatabaseUnavailable
from taskd.registry import Registry, default_registry

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
    """Merge the sources in precedence order and validate once."""
    args = build_parser().parse_args(argv)
    raw: dict[str, str] = {}
    dotenv = cwd / ".env"
    if dotenv.is_file():
        raw.update(parse_dotenv(dotenv.read_text(encoding="utf-8")))
    raw.update({s.env: environ[s.env] for s in SETTINGS if s.env in environ and not s.internal})
    raw.update({name: value for name, value in vars(args).items() if value is not None})
    return parse_settings(raw)


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


def main(argv: Sequence[str] | None = None) -> NoReturn:
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
    try:
        if url is None:
            from taskd.embedded import start_embedded

            embedded = start_embedded(settings.data_dir)
            url = embedded.url
            print(f"taskd: embedded PostgreSQL in {embedded.pgdata} at {url}", flush=True)
            banner = " (embedded)"
        with http_siblings(settings, url, list(sys.argv[1:] if argv is None else argv)) as settings:
            trio.run(functools.partial(server.serve, settings, default_registry, url, banner=banner))
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
    if problem is not None:
        fail(1, problem)
    raise SystemExit(0)


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
