"""The embedded PostgreSQL (pgserver) used when no DATABASE_URL is set, so a new
user needs nothing installed but Python. Its data lives in DATA_DIR/pgdata and
survives restarts; the server stops when the last taskd process using it exits.
Imports taskd.errors.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import warnings
from collections.abc import Callable

from taskd.errors import DatabaseUnavailable

log = logging.getLogger("taskd.embedded")


@dataclasses.dataclass(frozen=True)
class EmbeddedDatabase:
    pgdata: pathlib.Path
    url: str
    stop: Callable[[], None]


def start_embedded(data_dir: pathlib.Path) -> EmbeddedDatabase:
    """Start (or join) the embedded server in data_dir/pgdata; blocking, about a second on first start."""
    # pgserver asks platformdirs for a runtime folder; without XDG_RUNTIME_DIR (containers,
    # CI) platformdirs warns and falls back to /tmp, which is fine here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import pgserver  # imported here: it is heavy and only this mode needs it
    except ImportError as exc:
        raise DatabaseUnavailable(f"no DATABASE_URL set and the embedded server is unavailable: {exc}") from exc
    pgdata = (data_dir / "pgdata").resolve()
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:  # pgserver raises plain exceptions for initdb/pg_ctl failures
        raise DatabaseUnavailable(f"could not start the embedded PostgreSQL in {pgdata}: {exc}") from exc
    return EmbeddedDatabase(pgdata=pgdata, url=server.get_uri(), stop=server.cleanup)
