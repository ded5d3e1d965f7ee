"""Settings: what each one means, how its text is parsed and checked. No I/O.

The CLI gathers raw text from flags, the environment and `.env` (in that order
of precedence) and calls `parse_settings` once; the frozen `Settings` it returns
is all the rest of taskd ever reads.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from taskd.errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    worker_pool_size: int = 50
    max_retries: int = 3
    retry_delay: float = 5.0
    retry_delay_max: float = 600.0
    task_timeout: float = 300.0
    shutdown_grace: float = 30.0
    lease_seconds: float = 30.0
    task_modules: tuple[str, ...] = ()
    log_level: str = "INFO"
    data_dir: pathlib.Path = pathlib.Path(".taskd")
    max_body_bytes: int = 1024 * 1024
    db_pool_size: int = 10
    wait_for_db: bool = False
    http_workers: int = 1
    listen_fd: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its environment name, CLI flag(s), parser and help text."""

    env: str
    flags: tuple[str, ...]
    parse: Callable[[str], Any]
    help: str
    is_switch: bool = False
    internal: bool = False  # set by taskd for its own child processes; not documented to users

    @property
    def field(self) -> str:
        return self.env.lower()


def _int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds(low: float, high: float, *, allow_low: bool = True) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"must be a number of seconds, got {text!r}") from None
        if value != value or not (low < value or (allow_low and value == low)) or value > high:
            bound = ">=" if allow_low else ">"
            raise ValueError(f"must be {bound} {low:g} and <= {high:g} seconds, got {text.strip()}")
        return value

    return parse


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {text!r}")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def _modules(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"{name!r} is not a module name")
    return names


def _database_url(text: str) -> str | None:
    url = text.strip()
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("must start with postgresql:// or postgres://")
    return url


def _host(text: str) -> str:
    host = text.strip()
    if not host or any(ch.isspace() for ch in host):
        raise ValueError(f"must be a host name or address, got {text!r}")
    return host


def _path(text: str) -> pathlib.Path:
    if not text.strip():
        raise ValueError("must not be empty")
    return pathlib.Path(text.strip())


SETTINGS: tuple[Setting, ...] = (
    Setting("DATABASE_URL", ("--database-url",), _database_url,
            "PostgreSQL URL; unset: start an embedded PostgreSQL in DATA_DIR"),
    Setting("HOST", ("--host",), _host, "address the HTTP API listens on (default 127.0.0.1)"),
    Setting("PORT", ("--port",), _int(0, 65535), "port the HTTP API listens on (default 8000)"),
    Setting("WORKER_POOL_SIZE", ("--workers", "--worker-pool-size"), _int(0, 10_000),
            "tasks this process runs at once (default 50; 0 serves the API only)"),
    Setting("MAX_RETRIES", ("--max-retries",), _int(0, 1000),
            "retries after the first attempt, unless the task or its handler says otherwise (default 3)"),
    Setting("RETRY_DELAY", ("--retry-delay",), _seconds(0, 86_400),
            "base of the exponential retry backoff, with jitter (default 5 s)"),
    Setting("RETRY_DELAY_MAX", ("--retry-delay-max",), _seconds(0, 7 * 86_400),
            "cap on one retry's backoff (default 600 s)"),
    Setting("TASK_TIMEOUT", ("--task-timeout",), _seconds(0, 7 * 86_400, allow_low=False),
            "limit on one attempt, unless the task or its handler says otherwise (default 300 s)"),
    Setting("SHUTDOWN_GRACE", ("--shutdown-grace",), _seconds(0, 86_400),
            "on SIGTERM/SIGINT, how long running tasks may finish before they are cancelled (default 30 s)"),
    Setting("LEASE_SECONDS", ("--lease-seconds",), _seconds(0.5, 3600),
            "a claimed task's lease, renewed by heartbeat; a dead process's tasks run again after it (default 30 s)"),
    Setting("TASK_MODULES", ("--task-modules",), _modules,
            "comma-separated modules to import task handlers from"),
    Setting("LOG_LEVEL", ("--log-level",), _log_level, "DEBUG, INFO, WARNING or ERROR (default INFO)"),
    Setting("DATA_DIR", ("--data-dir",), _path, "where the embedded PostgreSQL keeps its data (default ./.taskd)"),
    Setting("MAX_BODY_BYTES", ("--max-body-bytes",), _int(1024, 1 << 30),
            "largest request body accepted (default 1 MiB)"),
    Setting("DB_POOL_SIZE", ("--db-pool-size",), _int(2, 1000),
            "connections for HTTP reads and housekeeping, besides the dedicated ones (default 10)"),
    Setting("WAIT_FOR_DB", ("--wait-for-db",), _bool,
            "keep retrying an unreachable database at start-up instead of exiting", is_switch=True),
    Setting("HTTP_WORKERS", ("--http-workers",), _int(1, 64),
            "processes serving HTTP on the same port (default 1); the extra ones run no task workers"),
    Setting("LISTEN_FD", ("--listen-fd",), _int(0, 65535),
            "serve HTTP on this inherited listening socket (set by --http-workers)", internal=True),
)


def parse_settings(raw: Mapping[str, str]) -> Settings:
    """Parse raw text values keyed by environment name; unknown names are ignored."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.env not in raw:
            continue
        try:
            values[setting.field] = setting.parse(raw[setting.env])
        except ValueError as exc:
            raise ConfigError(setting.env, str(exc)) from None
    return Settings(**values)


def parse_dotenv(text: str) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `#` comments, optional quotes and `export`."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(".env", f"line {number} is not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values
