"""The service's settings (serving/settings.py): FRAUD_* variables read once, typed."""

from __future__ import annotations

import pytest

from serving.settings import Settings


def test_defaults_and_names() -> None:
    settings = Settings.from_env({})
    assert settings.max_rows == 300_000 and settings.runtime == "auto"
    assert settings.api_key is None and settings.threads >= 1
    assert Settings.env_name("body_seconds") == "FRAUD_BODY_TIMEOUT_S"
    assert Settings.env_name("max_rows") == "FRAUD_MAX_ROWS"


def test_values_from_the_environment_typed_and_normalised() -> None:
    settings = Settings.from_env(
        {"FRAUD_MAX_ROWS": "10", "FRAUD_BODY_TIMEOUT_S": "2.5", "FRAUD_RUNTIME": "ONNX",
         "FRAUD_API_KEY": "", "FRAUD_THREADS": "0", "fraud_unknown_columns": "Reject"}
    )  # fmt: skip
    assert settings.max_rows == 10 and settings.body_seconds == 2.5
    assert settings.runtime == "onnx" and settings.unknown_columns == "reject"
    assert settings.api_key is None  # an empty key is no key
    assert settings.threads == 1


def test_process_environment_is_read_and_a_given_mapping_is_alone(monkeypatch) -> None:
    monkeypatch.setenv("FRAUD_MAX_ROWS", "7")
    assert Settings.from_env().max_rows == 7
    assert Settings.from_env({}).max_rows == 300_000


def test_bad_values_stop_with_one_line_naming_each_variable() -> None:
    with pytest.raises(SystemExit) as stop:
        Settings.load(
            {"FRAUD_MAX_ROWS": "10k", "FRAUD_RUNTIME": "gpu", "FRAUD_BODY_TIMEOUT_S": "-1"}
        )
    message = str(stop.value)
    assert "\n" not in message
    for name in ("FRAUD_MAX_ROWS", "FRAUD_RUNTIME", "FRAUD_BODY_TIMEOUT_S"):
        assert name in message


def test_the_api_key_is_never_in_a_repr() -> None:
    settings = Settings.from_env({"FRAUD_API_KEY": "hunter2"})
    assert settings.api_key == "hunter2"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
