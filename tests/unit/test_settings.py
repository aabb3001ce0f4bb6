"""Settings: defaults < TOML file < OPSTREAM_* environment < command-line flags, and the
rule that only the dev profile may turn authentication off."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from consumer.app import build_app
from consumer.auth.keys import auth_required
from consumer.cli.main import build_parser, main, settings_from_args
from consumer.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Each test sees only the OPSTREAM_* variables it sets itself."""
    for name in list(os.environ):
        if name.upper().startswith("OPSTREAM_"):
            monkeypatch.delenv(name)
    yield monkeypatch


@pytest.fixture
def toml_file(tmp_path: Path) -> Path:
    path = tmp_path / "opstream.toml"
    path.write_text(
        """
instance_id = "from-toml"

[kafka]
bootstrap_servers = "toml:9092"
group_id = "toml-group"
client_id = "toml-client"

[intake]
max_in_flight = 7

[topics]
requests = "toml.requests"
allowed_reply_topics = ["toml.replies.*"]
""",
        encoding="utf-8",
    )
    return path


def test_defaults_are_production_with_auth_required() -> None:
    settings = Settings()
    assert settings.profile == "production"
    assert settings.auth.required is True
    assert settings.kafka.bootstrap_servers is None
    assert settings.topics.requests == "ops.requests.v1"
    assert auth_required(settings) is True


def test_environment_sets_nested_fields(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPSTREAM_KAFKA__BOOTSTRAP_SERVERS", "env-a:9092,env-b:9092")
    clean_env.setenv("OPSTREAM_INTAKE__MAX_IN_FLIGHT", "3")
    clean_env.setenv("OPSTREAM_TOPICS__ALLOWED_REPLY_TOPICS", '["team.replies.*"]')
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "env-a:9092,env-b:9092"
    assert settings.intake.max_in_flight == 3
    assert settings.topics.allowed_reply_topics == ["team.replies.*"]


def test_invalid_environment_value_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPSTREAM_INTAKE__MAX_IN_FLIGHT", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_unknown_top_level_setting_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(kafak={"bootstrap_servers": "x"})  # type: ignore[call-arg]


def test_toml_file_is_read(toml_file: Path) -> None:
    settings = load_settings(toml_file)
    assert settings.kafka.bootstrap_servers == "toml:9092"
    assert settings.kafka.group_id == "toml-group"
    assert settings.intake.max_in_flight == 7
    assert settings.topics.requests == "toml.requests"
    assert settings.instance_id == "from-toml"
    assert settings.topics.replies == "ops.replies.v1"  # not in the file: the default


def test_missing_toml_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "absent.toml")


def test_missing_toml_file_makes_the_command_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", "--out", str(tmp_path), "--config", str(tmp_path / "x.toml")]) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_environment_wins_over_toml(toml_file: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPSTREAM_KAFKA__GROUP_ID", "env-group")
    clean_env.setenv("OPSTREAM_INTAKE__MAX_IN_FLIGHT", "9")
    settings = load_settings(toml_file)
    assert settings.kafka.group_id == "env-group"
    assert settings.intake.max_in_flight == 9
    assert settings.kafka.client_id == "toml-client"  # env said nothing: TOML stands
    assert settings.kafka.bootstrap_servers == "toml:9092"


def test_flags_win_over_environment_and_toml(
    toml_file: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("OPSTREAM_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    clean_env.setenv("OPSTREAM_KAFKA__GROUP_ID", "env-group")
    args = build_parser().parse_args(
        ["topics", "ensure", "--config", str(toml_file), "--bootstrap-servers", "flag:9092"]
    )
    settings = settings_from_args(args)
    assert settings.kafka.bootstrap_servers == "flag:9092"
    assert settings.kafka.group_id == "env-group"
    assert settings.kafka.client_id == "toml-client"


def test_flags_win_over_environment_without_a_file(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPSTREAM_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    args = build_parser().parse_args(
        ["run", "--bootstrap-servers", "flag:9092", "--http-port", "0"]
    )
    settings = settings_from_args(args)
    assert settings.kafka.bootstrap_servers == "flag:9092"
    assert settings.http.port == 0


def test_env_is_used_when_no_flag_is_given(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPSTREAM_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    settings = settings_from_args(build_parser().parse_args(["topics", "ensure"]))
    assert settings.kafka.bootstrap_servers == "env:9092"


def test_dev_command_turns_auth_off_in_the_dev_profile() -> None:
    settings = settings_from_args(build_parser().parse_args(["dev"]))
    assert settings.profile == "dev"
    assert settings.auth.required is False
    assert settings.kafka.fetch_max_wait_ms == 5
    assert auth_required(settings) is False


def test_dev_command_can_keep_auth_on() -> None:
    settings = settings_from_args(build_parser().parse_args(["dev", "--require-auth"]))
    assert settings.profile == "dev"
    assert auth_required(settings) is True


def test_auth_off_outside_the_dev_profile_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPSTREAM_AUTH__REQUIRED", "false")
    settings = Settings(kafka={"bootstrap_servers": "localhost:1"})  # type: ignore[arg-type]
    assert settings.profile == "production"
    with pytest.raises(ValueError, match="profile=dev"):
        auth_required(settings)
    with pytest.raises(ValueError, match="profile=dev"):
        build_app(settings)


def test_auth_off_in_the_dev_profile_is_allowed() -> None:
    settings = Settings(profile="dev", auth={"required": False})  # type: ignore[arg-type]
    assert auth_required(settings) is False
