"""The SQL loader: files under sql/ become named queries and ordered migrations.

A query file holds blocks that start with a River-style header:

    -- name: task_get :one
    -- One task by id.
    <the statement, up to the next header>

Kinds are :one, :many, :val and :exec (asyncpg's fetchrow, fetch, fetchval,
execute). Migrations are sql/migrations/NNNN_name.sql, applied in order.
Imports only taskd.errors.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import types
from collections.abc import Mapping

from taskd.errors import SqlFileError

KINDS = frozenset({"one", "many", "val", "exec"})
_HEADER = re.compile(r"^--\s*name:\s*(?P<name>\S+)\s+:(?P<kind>\w+)\s*$")
_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclasses.dataclass(frozen=True, slots=True)
class Query:
    name: str
    kind: str
    text: str
    doc: str
    origin: str  # file:line, for error messages


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str


def sql_root() -> pathlib.Path:
    """The sql/ folder: inside the installed package, else beside it in a checkout."""
    here = pathlib.Path(__file__).resolve().parent
    for candidate in (here / "_sql", here.parent / "sql"):
        if (candidate / "queries").is_dir():
            return candidate
    raise SqlFileError(f"no sql/ folder found beside {here}")


def parse_queries(text: str, origin: str) -> list[Query]:
    """Split one file into its named queries, checking each header, description and body."""
    queries: list[Query] = []
    current: tuple[str, str, int] | None = None
    doc: list[str] = []
    body: list[str] = []

    def finish() -> None:
        if current is None:
            return
        name, kind, line = current
        where = f"{origin}:{line}"
        sql_text = "\n".join(body).strip()
        if not doc:
            raise SqlFileError(f"{where}: query {name} has no description comment")
        if not sql_text:
            raise SqlFileError(f"{where}: query {name} has an empty body")
        queries.append(Query(name, kind, sql_text, " ".join(doc), where))

    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line.strip())
        if header:
            finish()
            name, kind = header["name"], header["kind"]
            if kind not in KINDS:
                raise SqlFileError(f"{origin}:{number}: query {name} has unknown kind :{kind}")
            current, doc, body = (name, kind, number), [], []
        elif current is None:
            if line.strip() and not line.strip().startswith("--"):
                raise SqlFileError(f"{origin}:{number}: SQL before the first '-- name:' header")
        elif not body and line.strip().startswith("--"):
            doc.append(line.strip().removeprefix("--").strip())
        else:
            body.append(line)
    finish()
    return queries


def load_queries(root: pathlib.Path) -> Mapping[str, Query]:
    """Every named query under root/queries, rejecting duplicate names."""
    found: dict[str, Query] = {}
    for path in sorted((root / "queries").glob("*.sql")):
        for query in parse_queries(path.read_text(encoding="utf-8"), path.name):
            if query.name in found:
                raise SqlFileError(
                    f"{query.origin}: query {query.name} is already defined at {found[query.name].origin}"
                )
            found[query.name] = query
    return types.MappingProxyType(found)


def load_migrations(root: pathlib.Path) -> list[Migration]:
    """Migrations under root/migrations, in version order, rejecting gaps and bad names."""
    migrations: list[Migration] = []
    for path in sorted((root / "migrations").glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise SqlFileError(f"{path.name}: migration files are named NNNN_name.sql")
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise SqlFileError(f"{path.name}: migration is empty")
        migrations.append(Migration(int(match["version"]), match["name"], text))
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise SqlFileError(f"migration {migration.version:04d} found where {expected:04d} was expected")
    return migrations


@functools.cache
def queries() -> Mapping[str, Query]:
    """The shipped queries, loaded once."""
    return load_queries(sql_root())


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """The shipped migrations, loaded once."""
    return tuple(load_migrations(sql_root()))
