"""Settings: what each one means, how its text is parsed and checked; and the
database URL's checks and its redacted form for printing.

`load_settings` gathers raw text from the environment and `./.env` (plus, for
the CLI, its flags, which win) and calls `parse_settings` once; the frozen
`Settings` it returns is all the rest of taskd ever reads. Reading `./.env` is
the only I/O here. Imports taskd.errors.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import re
import urllib.parse
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
    max_crashes: int = 3
    # 0 here means "not set": resolved below to twice the pool, so it is always a count once built.
    max_threads: int = 0
    # (queue, slots) pairs: this process serves only these queues, each with its own slots.
    # Empty: every queue, all slots shared.
    queues: tuple[tuple[str, int], ...] = ()
    # How long finished tasks are kept before pruning, in seconds (0: forever). The
    # cancelled one applies to expired tasks too.
    retention_completed: float = 7 * 86_400.0
    retention_failed: float = 30 * 86_400.0
    retention_cancelled: float = 7 * 86_400.0

    def __post_init__(self) -> None:
        slots = sum(n for _, n in self.queues)
        if self.queues and self.worker_pool_size not in (0, slots):
            raise ConfigError("QUEUES", f"its slots add up to {slots}, but WORKER_POOL_SIZE (--workers) is "
                                        f"{self.worker_pool_size}; leave --workers out, or make them agree")
        if self.max_threads == 0:
            # Each worker may leave one abandoned thread behind after a timeout, hence twice; an
            # API-only process (no workers) still gets one for the odd plain-def call.
            object.__setattr__(self, "max_threads", max(1, 2 * self.worker_pool_size))


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


# The URL is read by asyncpg, not libpq: these checks are what asyncpg's parser and
# connect() would otherwise fail on (with a ValueError, an OverflowError, an IndexError
# or a ClientConfigurationError, each a 75-line traceback), found before anything runs.
# No message quotes the URL, and one quotes a host, a port or a value only when `quote`
# says no password can have run into it (an unescaped '/', '?' or '#' in a password
# moves the rest of it into the port, the path or the query).
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_VERIFYING_SSL_MODES = ("require", "verify-ca", "verify-full")
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_CHOICES = {
    "sslmode": _SSL_MODES,
    "sslnegotiation": ("postgres", "direct"),
    "ssl_min_protocol_version": _TLS_VERSIONS,
    "ssl_max_protocol_version": _TLS_VERSIONS,
    "target_session_attrs": ("any", "primary", "standby", "prefer-standby", "read-write", "read-only"),
    "gsslib": ("gssapi", "sspi"),
}
# libpq connection options asyncpg does not read. It passes every option it does not know
# to the server as a session setting, and the server refuses these at connect time.
_LIBPQ_ONLY = frozenset({
    "hostaddr", "connect_timeout", "fallback_application_name", "keepalives", "keepalives_idle",
    "keepalives_interval", "keepalives_count", "tcp_user_timeout", "require_auth", "channel_binding",
    "gssencmode", "gssdelegation", "requiressl", "sslcompression", "sslcertmode", "sslcrldir", "sslsni",
    "sslkeylogfile", "requirepeer", "load_balance_hosts",
})
_ENCODE_HINT = "percent-encode '@', ':', '/', '?' and '#' in a user name or password"


def _port_problem(text: str, *, quote: bool) -> str | None:
    if not (text.isascii() and text.isdigit()):
        return f"has a port that is not a number ({_ENCODE_HINT})"
    if not 1 <= int(text) <= 65535:
        shown = f"port {int(text)}" if quote else "a port"
        return f"{shown} is out of range (1 to 65535)"
    return None


def _host_problem(host: str, *, quote: bool) -> str | None:
    if host.startswith("/"):
        return None  # a Unix-socket directory
    if not host:
        return f"has a port with no host name before it (an IPv6 address goes in brackets: [::1]:5432; {_ENCODE_HINT})"
    try:
        host.encode("idna")  # what the resolver will do with it; fails on an empty or over-long label
    except UnicodeError:
        shown = f"host name {host!r}" if quote else "a host name"
        return f"{shown} is not valid (each dot-separated part is 1 to 63 characters)"
    return None


def _host_list_problem(hosts: str, *, encoded: bool, quote: bool) -> str | None:
    """What asyncpg cannot use in `host1:port1,host2:port2` (libpq's multi-host form)."""
    for spec in hosts.split(","):
        if not spec:
            return "has an empty entry in its host list"
        if spec.startswith("/"):
            continue  # asyncpg takes a leading '/' as a socket directory, ':' and all
        if spec.startswith("["):
            match = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", spec)
            if match is None:
                return "has an IPv6 address that is not [address] or [address]:port"
            host, port = match.group(1), match.group(2) or ""
            try:
                ipaddress.ip_address(urllib.parse.unquote(host))
            except ValueError:
                return "has something in [brackets] that is not an IPv6 address"
        else:
            host, _, port = spec.partition(":")
            if encoded:
                host, port = urllib.parse.unquote(host), urllib.parse.unquote(port)
            problem = _host_problem(host, quote=quote)
            if problem:
                return problem
        if port:
            problem = _port_problem(port, quote=quote)
            if problem:
                return problem
    return None


def _query_problem(query: str, *, has_hosts: bool, quote: bool) -> str | None:
    try:
        fields = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return "has a query field that is not name=value (percent-encode '&', '=' and '#' inside a value)"
    # asyncpg drops blank values and keeps the last of repeated names.
    options = {name: value for name, value in fields if value}
    for name in options:
        if name in _LIBPQ_ONLY:
            return f"{name} is a libpq option that asyncpg (taskd's driver) does not support; remove it"
        if name == "ssl":
            return "ssl is not a connection option; use sslmode=require (or verify-full)"
    for name, allowed in _CHOICES.items():
        value = options.get(name)
        if value is not None and value not in allowed and value.replace("_", "-") not in allowed:
            return f"{name} must be one of {', '.join(allowed)}" + (f", got {value!r}" if quote else "")
    if options.get("sslnegotiation") == "direct" and options.get("sslmode", "").replace("_", "-") not in (
            _VERIFYING_SSL_MODES):
        return "sslnegotiation=direct needs sslmode=require, verify-ca or verify-full in the URL"
    ports = options.get("port")
    if ports is not None:
        for port in ports.split(","):
            problem = _port_problem(port, quote=quote)
            if problem:
                return problem
    hosts = options.get("host")
    if hosts is not None:
        problem = _host_list_problem(hosts, encoded=False, quote=quote)
        if problem:
            return problem
    if ports is not None and "," in ports and not has_hosts:
        # asyncpg uses the query's ports only when the URL names no host before the path.
        host_count = len(hosts.split(",")) if hosts else 0
        if host_count != len(ports.split(",")):
            return f"port lists {len(ports.split(','))} ports for {host_count or 'no'} hosts"
    return None


def database_url_problem(url: str) -> str | None:
    """What in a postgresql:// URL asyncpg could not use, in words that never quote a password; None if fine."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "must not contain spaces or control characters (percent-encode them: a space is %20)"
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        return "must start with postgresql:// or postgres://"
    if "#" in url:
        return f"has a '#' ({_ENCODE_HINT})"
    try:
        parts = urllib.parse.urlparse(url)
    except ValueError:
        return "has a host part that cannot be read (an IPv6 address is written [::1] or [::1]:5432)"
    if "@" in parts.path:
        return f"has an '@' after the host ({_ENCODE_HINT}; an '@' in a database name is %40)"
    # asyncpg splits user from host at the first '@', a URL parser at the last: two of
    # them would send the rest of the password to the resolver as a host name.
    _, at, hosts = parts.netloc.partition("@")
    if not at:
        hosts = parts.netloc
    if "@" in hosts:
        return f"has more than one '@' before the host ({_ENCODE_HINT})"
    # Without '@' before the host an '@' further on means the password ran into the
    # path or the query; quote nothing from the host part then.
    quote = bool(at) or "@" not in rest
    if hosts:
        problem = _host_list_problem(hosts, encoded=True, quote=quote)
        if problem:
            return problem
    if parts.query:
        return _query_problem(parts.query, has_hosts=bool(hosts), quote=quote)
    return None


def _database_url(text: str) -> str | None:
    url = text.strip()
    if not url:
        return None
    problem = database_url_problem(url)
    if problem:
        raise ValueError(problem)
    return url


# Query options whose value is a secret; matched in any case, after percent-decoding.
_SECRET_WORDS = ("password", "secret", "token")
# host[:port] or [v6]:port, comma-separated: what a netloc with no '@' should look like.
_HOST_PORT = r"(?:\[[^\]]*\]|[^:,\[]*)(?::[0-9]*)?"
_PLAIN_HOSTS = re.compile(rf"{_HOST_PORT}(?:,{_HOST_PORT})*")


def _redacted_query(query: str) -> str:
    fields: list[str] = []
    for field in query.split("&"):
        name, eq, _value = field.partition("=")
        key = urllib.parse.unquote_plus(name).strip().lower()
        if not eq:
            fields.append("***" if field else field)  # not name=value: maybe a piece of a password
        elif any(word in key for word in _SECRET_WORDS):
            fields.append(f"{name}=***")
        else:
            fields.append(field)
    return "&".join(fields)


def redacted_url(url: str) -> str:
    """The URL with every password in it (user:password@, ?password=, ?sslpassword=, ...) shown as ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if url else url
    ends = [i for i in (rest.find(ch) for ch in "/?#") if i >= 0]
    end = min(ends, default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    tail, hash_, fragment = tail.partition("#")
    path, question, query = tail.partition("?")
    if "@" in netloc:
        # Up to the last '@', so that a raw '@' in a password is hidden with the rest of it.
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, password = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon and password else netloc
    elif "@" in path or "@" in fragment or not _PLAIN_HOSTS.fullmatch(netloc):
        # A password holding '/', '?' or '#' cut the URL short: where it ends is anyone's guess.
        return f"{scheme}://***"
    shown = f"{scheme}://{netloc}{path}"
    if question:
        shown += f"?{_redacted_query(query)}"
    if hash_:
        shown += "#***"
    return shown


def _host(text: str) -> str:
    host = text.strip()
    if not host or any(ch.isspace() for ch in host):
        raise ValueError(f"must be a host name or address, got {text!r}")
    return host


_QUEUE_NAME = re.compile(r"[a-z0-9_.-]{1,64}")


def _queues(text: str) -> tuple[tuple[str, int], ...]:
    """name=slots pairs, comma-separated: default=40,emails=10."""
    pairs: list[tuple[str, int]] = []
    for part in text.split(","):
        name, sep, count = part.strip().partition("=")
        name = name.strip()
        if not sep or not _QUEUE_NAME.fullmatch(name):
            raise ValueError(f"{part.strip()!r}: give queue=slots pairs like default=40,emails=10 (queue names: "
                             "1 to 64 of a-z, 0-9, '_', '.' and '-')")
        if name in dict(pairs):
            raise ValueError(f"queue {name!r} is given twice")
        pairs.append((name, _int(1, 10_000)(count)))
    return tuple(pairs)


_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[smhd]?)", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
RETENTION_MAX_DAYS = 36_500  # a hundred years: past that, "forever" (0) is what is meant


def _retention(text: str) -> float:
    """A duration, 30m, 12h, 7d, 45s or plain seconds; 0 keeps forever."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"must be a duration like 30m, 12h or 7d, or seconds (0 keeps forever), got {text!r}")
    seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"].lower()]
    if seconds > RETENTION_MAX_DAYS * 86_400:
        raise ValueError(f"must be at most {RETENTION_MAX_DAYS}d (use 0 to keep forever), got {text.strip()}")
    return seconds


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
    Setting("MAX_CRASHES", ("--max-crashes",), _int(1, 1000),
            "crashes (its process died or lost its lease while running it) after which a crash in quarantine "
            "fails the task (default 3)"),
    Setting("QUEUES", ("--queues",), _queues,
            "serve only these queues, with slots split between them: default=40,emails=10 (--workers then "
            "defaults to their sum); unset: every queue, all slots shared"),
    Setting("MAX_THREADS", ("--max-threads",), _int(1, 100_000),
            "threads plain-def handlers may occupy, abandoned ones still running after a timeout included "
            "(default twice WORKER_POOL_SIZE, at least 1)"),
    Setting("RETENTION_COMPLETED", ("--retention-completed",), _retention,
            "how long completed tasks are kept before they are deleted: 30m, 12h, 7d or seconds; 0 keeps "
            "them forever (default 7d)"),
    Setting("RETENTION_FAILED", ("--retention-failed",), _retention,
            "how long failed tasks are kept (default 30d; 0: forever)"),
    Setting("RETENTION_CANCELLED", ("--retention-cancelled",), _retention,
            "how long cancelled and expired tasks are kept (default 7d; 0: forever)"),
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
    if "queues" in values and "worker_pool_size" not in values:
        values["worker_pool_size"] = sum(n for _, n in values["queues"])
    return Settings(**values)


_PUBLIC = frozenset(s.env for s in SETTINGS if not s.internal)
_INTERNAL = frozenset(s.env for s in SETTINGS if s.internal)


def load_settings(environ: Mapping[str, str] | None = None, cwd: pathlib.Path | None = None, *,
                  overrides: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, then `cwd/.env`, then the defaults, as `python -m taskd` reads them.

    `overrides` (raw text keyed by environment name: the CLI's flags) win over both."""
    environ = os.environ if environ is None else environ
    dotenv = (pathlib.Path.cwd() if cwd is None else cwd) / ".env"
    raw: dict[str, str] = {}
    if dotenv.is_file():
        try:
            text = dotenv.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(".env", f"{dotenv} is not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(".env", f"cannot read {dotenv}: {exc.strerror or exc}") from None
        raw.update(parse_dotenv(text))
    raw.update({name: value for name, value in environ.items() if name in _PUBLIC})
    raw = {name: value for name, value in raw.items() if name not in _INTERNAL}
    raw.update(overrides or {})
    return parse_settings(raw)


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
