"""Shared fixtures: a PostgreSQL server for the whole session (TASKD_TEST_DATABASE_URL,
else an embedded one), a migrated template database, and a fresh database per test
cloned from it (procrastinate's pattern), dropped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pathlib
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import trio
import trio_asyncio

ROOT = pathlib.Path(__file__).resolve().parent.parent


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database (works for socket URLs too)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def _admin(url: str, *statements: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The admin URL of the PostgreSQL server the tests use."""
    url = os.environ.get("TASKD_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="taskd-test-pg-") as tmp:
        server = pgserver.get_server(pathlib.Path(tmp) / "pgdata", cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    """A database with taskd's migrations applied, to clone per test."""
    from taskd import db
    from taskd.migrations import apply_migrations

    name = f"taskd_template_{os.getpid()}"
    _admin(server_url, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")

    async def migrate() -> None:
        async with trio_asyncio.open_loop():
            conn = await db.connect(with_database(server_url, name))
            try:
                await apply_migrations(conn)
            finally:
                await conn.close()

    trio.run(migrate)
    try:
        yield name
    finally:
        _admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


_counter = itertools.count()


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A database of its own for one test (a copy of template, if given); dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    _admin(server_url, f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    try:
        yield with_database(server_url, name)
    finally:
        _admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with scratch_database(server_url, "taskd_test", template_db) as url:
        yield url


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A fresh database with no taskd schema."""
    with scratch_database(server_url, "taskd_empty") as url:
        yield url


@pytest.fixture
async def aio_loop() -> AsyncIterator[object]:
    """The asyncio loop asyncpg runs on, inside the test's trio run."""
    async with trio_asyncio.open_loop() as loop:
        yield loop
