import pathlib
import re

import pytest

from taskd import sql, store
from taskd.errors import SqlFileError

TASKD = pathlib.Path(store.__file__).parents[1]


def test_parses_header_description_and_body() -> None:
    (q,) = sql.parse_queries("-- name: thing_get :one\n-- Get a thing.\nSELECT 1;\n", "x.sql")
    assert (q.name, q.kind, q.doc, q.text, q.origin) == ("thing_get", "one", "Get a thing.", "SELECT 1;", "x.sql:1")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("-- name: a :one\nSELECT 1;\n", "no description"),
        ("-- name: a :one\n-- Doc.\n\n", "empty body"),
        ("-- name: a :bogus\n-- Doc.\nSELECT 1;\n", "unknown kind"),
        ("SELECT 1;\n-- name: a :one\n-- Doc.\nSELECT 1;\n", "before the first"),
    ],
)
def test_rejects_malformed_files(text: str, problem: str) -> None:
    with pytest.raises(SqlFileError, match=problem):
        sql.parse_queries(text, "bad.sql")


def test_rejects_duplicate_names(tmp_path: pathlib.Path) -> None:
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "a.sql").write_text("-- name: x_get :one\n-- Doc.\nSELECT 1;\n")
    (tmp_path / "queries" / "b.sql").write_text("-- name: x_get :val\n-- Doc.\nSELECT 2;\n")
    with pytest.raises(SqlFileError, match="already defined at a.sql:1"):
        sql.load_queries(tmp_path)


def test_migrations_are_numbered_without_gaps(tmp_path: pathlib.Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "migrations" / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(SqlFileError, match="0003 found where 0002"):
        sql.load_migrations(tmp_path)


def test_shipped_migrations_load_in_order() -> None:
    versions = [m.version for m in sql.migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_every_query_store_needs_exists_and_every_query_is_used() -> None:
    loaded = set(sql.queries())
    assert store.QUERIES_USED <= loaded
    python = "\n".join(p.read_text() for p in TASKD.rglob("*.py"))
    unused = {name for name in loaded if not re.search(rf"\[\"{name}\"\]", python)}
    assert not unused, f"queries nobody runs: {unused}"
    undeclared = set(re.findall(r'_q\["(\w+)"\]|queries\["(\w+)"\]', python))
    names = {a or b for a, b in undeclared}
    assert names <= store.QUERIES_USED


def test_no_sql_text_in_python_modules() -> None:
    pattern = re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+\.?\w* SET|DELETE FROM)\b")
    offenders = [p.name for p in TASKD.glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
