import pathlib

import pytest

from taskd import cli
from taskd.config import Settings, load_settings, parse_dotenv, parse_settings, redacted_url
from taskd.errors import ConfigError


def test_defaults_match_the_documented_ones() -> None:
    s = parse_settings({})
    assert (s.worker_pool_size, s.max_retries, s.retry_delay) == (50, 3, 5.0)
    assert (s.task_timeout, s.shutdown_grace) == (300.0, 30.0)
    assert (s.host, s.port, s.database_url, s.max_body_bytes) == ("127.0.0.1", 8000, None, 1024 * 1024)
    assert s.data_dir == pathlib.Path(".taskd")


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("WORKER_POOL_SIZE", "abc", "whole number"),
        ("PORT", "70000", "between 0 and 65535"),
        ("RETRY_DELAY", "-1", ">= 0"),
        ("TASK_TIMEOUT", "0", "> 0"),
        ("TASK_TIMEOUT", "nan", "> 0"),
        ("LOG_LEVEL", "LOUD", "one of"),
        ("DATABASE_URL", "mysql://x", "postgresql://"),
        ("TASK_MODULES", "good, not-a-module", "not a module"),
        ("WAIT_FOR_DB", "maybe", "true or false"),
    ],
)
def test_invalid_values_name_the_setting(name: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({name: value})
    assert info.value.setting == name
    assert problem in info.value.problem


def test_flags_beat_environment_beat_dotenv(tmp_path: pathlib.Path) -> None:
    (tmp_path / ".env").write_text("PORT=1111\nHOST=10.0.0.1\nMAX_RETRIES=7\n# a comment\nexport LOG_LEVEL='debug'\n")
    settings = cli.gather_settings(["--port", "3333"], {"PORT": "2222", "HOST": "0.0.0.0"}, tmp_path)
    assert (settings.port, settings.host, settings.max_retries, settings.log_level) == (3333, "0.0.0.0", 7, "DEBUG")


def test_workers_flag_sets_pool_size(tmp_path: pathlib.Path) -> None:
    assert cli.gather_settings(["--workers", "4"], {}, tmp_path).worker_pool_size == 4
    assert cli.gather_settings(["--wait-for-db"], {}, tmp_path).wait_for_db is True


def test_dotenv_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="line 2"):
        parse_dotenv("A=1\nthis is not a setting\n")


def test_invalid_setting_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: pathlib.Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKER_POOL_SIZE", "lots")
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WORKER_POOL_SIZE" in err and "Traceback" not in err


def test_unknown_flag_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--no-such-flag"])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


def test_env_example_lists_every_setting() -> None:
    from taskd.config import SETTINGS

    text = (pathlib.Path(__file__).parents[2] / ".env.example").read_text()
    missing = [s.env for s in SETTINGS if f"{s.env}=" not in text and not s.internal]
    assert missing == []


# -- DATABASE_URL: checked as asyncpg will read it, and never printed with a secret ----------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://u@127.0.0.1:99999/x", "port 99999 is out of range"),
        ("postgresql://u@127.0.0.1:0/x", "port 0 is out of range"),
        ("postgresql://u@127.0.0.1:abc/x", "port that is not a number"),
        ("postgresql://u@h1:5432,h2:70000/x", "port 70000 is out of range"),
        ("postgresql://u@[::1]:99999/x", "port 99999 is out of range"),
        ("postgresql://u@::1/x", "no host name"),
        ("postgresql://u@,h/x", "empty entry in its host list"),
        ("postgresql://u@[zz]/x", "host part that cannot be read"),
        ("postgresql://u@[::1/x", "host part that cannot be read"),
        ("postgresql://u@" + "a" * 64 + ".example.com/x", "is not valid"),
        ("postgresql://u@a..b/x", "is not valid"),
        ("postgresql://u@h/x?port=99999", "port 99999 is out of range"),
        ("postgresql://u@/x?host=h1:abc", "port that is not a number"),
        ("postgresql://u@/x?host=h1,h2&port=1,2,3", "3 ports for 2 hosts"),
        ("postgresql://u@h/my db", "spaces or control characters"),
        ("postgresql://u@h/x\x00", "spaces or control characters"),
        ("postgresql://u@h/x?sslmode=bogus", "sslmode must be one of"),
        ("postgresql://u@h/x?sslnegotiation=direct", "needs sslmode=require"),
        ("postgresql://u@h/x?target_session_attrs=leader", "target_session_attrs must be one of"),
        ("postgresql://u@h/x?ssl_min_protocol_version=SSLv3", "ssl_min_protocol_version must be one of"),
        ("postgresql://u@h/x?gsslib=kerberos", "gsslib must be one of"),
        ("postgresql://u@h/x?connect_timeout=10", "connect_timeout is a libpq option"),
        ("postgresql://u@h/x?ssl=true", "use sslmode=require"),
        ("postgresql://u@h/x?nokey", "not name=value"),
        ("postgresql://u@h/x?a=1&&b=2", "not name=value"),
        ("postgresql://u:p@ss@h/x", "more than one '@'"),
        ("postgres://h/x#frag", "has a '#'"),
        ("http://h/x", "postgresql://"),
    ],
)
def test_database_url_that_asyncpg_cannot_use_is_one_config_error(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"DATABASE_URL": url})
    assert info.value.setting == "DATABASE_URL"
    assert problem in info.value.problem, info.value.problem
    assert "\n" not in info.value.problem


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgres://u:p%40ss@db.example.com/app",
        "postgresql://postgres@/db?host=/tmp/x",
        "postgresql://postgres@%2Ftmp%2Fx/db",
        "postgresql:///db",
        "postgresql://h1:5432,h2:5433,h3/db?target_session_attrs=read-write",
        "postgresql://u@/db?host=h1,h2&port=5432,5433",
        "postgresql://u@[::1]:5432/db",
        "postgresql://u@[fe80::1%25eth0]/db",
        "postgresql://u@h:/db",
        "postgresql://u@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=taskd",
        "postgresql://u@h/db?sslmode=require&sslnegotiation=direct&ssl_min_protocol_version=TLSv1.3",
        "postgresql://u@h/db?sslmode=&password=x&statement_timeout=5000",
        "  postgresql://u@h/db  ",
    ],
)
def test_database_url_that_asyncpg_reads_is_accepted(url: str) -> None:
    assert parse_settings({"DATABASE_URL": url}).database_url == url.strip()


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://u:hunter2@127.0.0.1:99999/x", "hunter2"),
        ("postgresql://u@127.0.0.1:99999/x?password=hunter2", "hunter2"),
        ("postgresql://u:24680/more@h/x", "24680"),  # an unescaped '/' moves the password into the port...
        ("postgresql://u:97531?more=1@h/x", "97531"),  # ... and so does a '?'
        ("postgresql://u:pw@zq7x@h:99999/x", "zq7x"),  # a raw '@': asyncpg would take "zq7x@h" for the host
        ("postgresql://u:hun#ter2@h/x", "ter2"),
        ("postgresql://u:hunter2@h/x?sslmode=bogus", "hunter2"),
    ],
)
def test_database_url_problems_never_quote_the_password(url: str, secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"DATABASE_URL": url})
    assert secret not in info.value.problem


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db?password=secret", "postgresql://u@h/db?password=***"),
        ("postgresql://u@h/db?PassWord=a&sslmode=require&password=b", "postgresql://u@h/db?PassWord=***&sslmode=require&password=***"),
        ("postgresql://u@h/db?pass%77ord=secret", "postgresql://u@h/db?pass%77ord=***"),
        ("postgresql://u@h/db?sslpassword=secret&sslkey=/k.pem", "postgresql://u@h/db?sslpassword=***&sslkey=/k.pem"),
        ("postgresql://u:s1@h/db?password=s2", "postgresql://u:***@h/db?password=***"),
        ("postgresql://postgres@/db?host=/tmp/x", "postgresql://postgres@/db?host=/tmp/x"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:@h/db", "postgresql://u:@h/db"),
        ("postgresql://u:pw@[::1]:5432,h2:5433/db", "postgresql://u:***@[::1]:5432,h2:5433/db"),
        ("postgresql://h:5432/db?user=a@b&application_name=x", "postgresql://h:5432/db?user=a@b&application_name=x"),
        ("postgresql://u:pa/ss@h/db", "postgresql://***"),
        ("postgresql://u:pa?ss@h/db", "postgresql://***"),
        ("postgresql://u:pa#ss@h/db", "postgresql://***"),
        ("postgresql://u@h/db?secretword", "postgresql://u@h/db?***"),
        ("host=h password=secret", "***"),
    ],
)
def test_redacted_url_hides_every_password(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


# -- settings for crash accounting and handler threads ------------------------------------------------


def test_max_crashes_defaults_to_3_and_is_bounded() -> None:
    assert parse_settings({}).max_crashes == 3
    assert parse_settings({"MAX_CRASHES": "1"}).max_crashes == 1
    for bad in ("0", "1001", "three"):
        with pytest.raises(ConfigError, match="MAX_CRASHES"):
            parse_settings({"MAX_CRASHES": bad})


def test_max_threads_defaults_to_twice_the_pool_and_is_always_a_count(tmp_path: pathlib.Path) -> None:
    assert parse_settings({}).max_threads == 100
    assert parse_settings({"WORKER_POOL_SIZE": "7"}).max_threads == 14
    assert cli.gather_settings(["--workers", "0"], {}, tmp_path).max_threads == 1
    assert cli.gather_settings(["--workers", "4", "--max-threads", "3"], {}, tmp_path).max_threads == 3
    assert Settings(worker_pool_size=5).max_threads == 10
    for bad in ("0", "100001", "-1"):
        with pytest.raises(ConfigError, match="MAX_THREADS"):
            parse_settings({"MAX_THREADS": bad})


# -- load_settings: the one rule, for the CLI and for library code -----------------------------------


def test_load_settings_reads_environment_over_dotenv(tmp_path: pathlib.Path) -> None:
    (tmp_path / ".env").write_text("PORT=1111\nMAX_CRASHES=5\nDATABASE_URL=postgresql://from-dotenv/db\n")
    settings = load_settings({"PORT": "2222", "UNRELATED": "x"}, tmp_path)
    assert (settings.port, settings.max_crashes, settings.database_url) == (2222, 5, "postgresql://from-dotenv/db")


def test_load_settings_defaults_to_os_environ_and_the_working_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    (tmp_path / ".env").write_text("MAX_RETRIES=9\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKER_POOL_SIZE", "6")
    settings = load_settings()
    assert (settings.max_retries, settings.worker_pool_size, settings.max_threads) == (9, 6, 12)


def test_load_settings_ignores_internal_settings_outside_flags(tmp_path: pathlib.Path) -> None:
    (tmp_path / ".env").write_text("LISTEN_FD=5\n")
    assert load_settings({"LISTEN_FD": "6"}, tmp_path).listen_fd is None
    assert load_settings({}, tmp_path, overrides={"LISTEN_FD": "7"}).listen_fd == 7


def test_load_settings_reports_an_unreadable_dotenv_in_one_line(tmp_path: pathlib.Path) -> None:
    (tmp_path / ".env").write_bytes(b"PORT=\xff\n")
    with pytest.raises(ConfigError) as info:
        load_settings({}, tmp_path)
    assert info.value.setting == ".env" and "UTF-8" in info.value.problem


def test_gather_settings_follows_load_settings(tmp_path: pathlib.Path) -> None:
    (tmp_path / ".env").write_text("MAX_THREADS=40\nLISTEN_FD=5\n")
    settings = cli.gather_settings(["--max-crashes", "2"], {"MAX_CRASHES": "8"}, tmp_path)
    assert (settings.max_crashes, settings.max_threads, settings.listen_fd) == (2, 40, None)
