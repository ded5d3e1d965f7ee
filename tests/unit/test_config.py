import pathlib

import pytest

from taskd import cli
from taskd.config import Settings, parse_dotenv, parse_settings
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
