"""Secrets in the settings: read from ``*_FILE`` mounts, warned about as flags, never printed."""

from __future__ import annotations

import json
import logging
import os
import typing
from pathlib import Path

import pytest
from pydantic import SecretStr

from inference_service import cli
from inference_service.errors import ConfigError
from inference_service.settings import (
    SECRET_FILES,
    Settings,
    env_name,
    load_settings,
    overrides_from_args,
)

PASSWORD = "pa55-w0rd with spaces "
TOKEN = "t0ken-for-http"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INFERENCE_"):
            monkeypatch.delenv(name)


def test_every_secret_setting_has_a_file_form() -> None:
    secrets = {
        name
        for name, field in Settings.model_fields.items()
        if SecretStr in typing.get_args(field.annotation) or field.annotation is SecretStr
    }
    assert secrets == set(SECRET_FILES) == {"kafka_sasl_password", "http_token"}
    for secret, file_field in SECRET_FILES.items():
        assert env_name(file_field) == env_name(secret) + "_FILE"


@pytest.mark.parametrize("secret", sorted(SECRET_FILES))
@pytest.mark.parametrize("ending", ["", "\n", "\r\n"])
def test_the_file_is_read_with_its_trailing_newline_stripped(
    secret: str, ending: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret"
    path.write_bytes((PASSWORD + ending).encode())
    monkeypatch.setenv(env_name(SECRET_FILES[secret]), str(path))
    value = getattr(load_settings(), secret)
    assert isinstance(value, SecretStr) and value.get_secret_value() == PASSWORD


def test_the_file_form_satisfies_sasl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    monkeypatch.setenv("INFERENCE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("INFERENCE_KAFKA_SASL_USERNAME", "svc")
    with pytest.raises(ConfigError, match="INFERENCE_KAFKA_SASL_PASSWORD_FILE"):
        load_settings()  # the message names the file form too
    monkeypatch.setenv("INFERENCE_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "pw"))
    s = load_settings()
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == PASSWORD


@pytest.mark.parametrize("secret", sorted(SECRET_FILES))
@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text(""), "empty"),
        (lambda p: p.write_text("\n"), "empty"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
    ],
    ids=["missing", "directory", "empty", "newline-only", "binary"],
)
def test_an_unusable_file_stops_start_up_naming_the_variable(
    secret: str,
    make: typing.Callable[[Path], None],
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "secret"
    make(path)
    var = env_name(SECRET_FILES[secret])
    monkeypatch.setenv(var, str(path))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert var in str(err.value) and needle in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret"
    path.write_text(TOKEN)
    path.chmod(0)
    monkeypatch.setenv("INFERENCE_HTTP_TOKEN_FILE", str(path))
    with pytest.raises(ConfigError, match=r"INFERENCE_HTTP_TOKEN_FILE.*permission denied"):
        load_settings()


def test_both_forms_at_once_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "t").write_text(TOKEN)
    monkeypatch.setenv("INFERENCE_HTTP_TOKEN_FILE", str(tmp_path / "t"))
    monkeypatch.setenv("INFERENCE_HTTP_TOKEN", "other")
    with pytest.raises(ConfigError) as err:
        load_settings()
    text = str(err.value)
    assert "INFERENCE_HTTP_TOKEN and INFERENCE_HTTP_TOKEN_FILE" in text
    assert TOKEN not in text and "other" not in text
    monkeypatch.setenv("INFERENCE_HTTP_TOKEN", "")  # empty is unset: the file alone counts
    assert load_settings().http_token == SecretStr(TOKEN)


def test_a_secret_given_as_a_flag_is_taken_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["settings", "--kafka-sasl-password", PASSWORD, "--http-token", TOKEN])
    with caplog.at_level(logging.WARNING, logger="inference_service.settings"):
        overrides = overrides_from_args(args)
    assert overrides == {"kafka_sasl_password": PASSWORD, "http_token": TOKEN}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "--kafka-sasl-password" in warnings[0]
    assert "INFERENCE_KAFKA_SASL_PASSWORD_FILE" in warnings[0]
    assert "INFERENCE_HTTP_TOKEN_FILE" in warnings[1]
    assert all(PASSWORD not in w and TOKEN not in w for w in warnings)
    caplog.clear()
    overrides_from_args(parser.parse_args(["settings", "--http-token-file", "/run/t"]))
    assert not caplog.records  # a path is no secret


def test_a_refused_secret_value_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"http_token": 123456789})  # not a string
    assert "INFERENCE_HTTP_TOKEN" in str(err.value)
    assert "123456789" not in str(err.value)


def test_the_settings_command_never_prints_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    monkeypatch.setenv("INFERENCE_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "pw"))
    assert cli.main(["settings", "--effective", "--http-token", TOKEN]) == 0
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err and TOKEN not in out + err
    shown = json.loads(out)
    assert shown["kafka_sasl_password"] == shown["http_token"] == "**********"
    assert shown["kafka_sasl_password_file"] == str(tmp_path / "pw")
    assert cli.main(["settings"]) == 0
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err and TOKEN not in out + err
    assert "INFERENCE_HTTP_TOKEN_FILE" in out
