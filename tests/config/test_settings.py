"""STORAGE_TYPE and the other settings: a refused value is reported by name, with what is
accepted, at the start of every entry point (issue 13, bug 10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import SettingsError, get_settings, load_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_unsupported_storage_type_names_the_variable_and_the_supported_values(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_TYPE", "s3")
    with pytest.raises(SettingsError) as caught:
        get_settings()
    assert str(caught.value) == (
        "invalid configuration: STORAGE_TYPE='s3' is not supported; supported values: local")
    assert caught.value.__suppress_context__, "no pydantic report chained under it"


def test_every_refused_variable_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_DEVICE", "gpu")
    monkeypatch.setenv("AUDIO_MAX_FILE_SIZE", "lots")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "AI_DEVICE='gpu' is not supported; supported values: cpu, cuda, auto" in message
    assert "AUDIO_MAX_FILE_SIZE='lots' is not valid" in message


def test_model_checks_keep_their_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(SettingsError, match="SECRET_KEY must be set outside development and test"):
        get_settings()


def test_supported_storage_type_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_TYPE", "local")
    assert get_settings().STORAGE_TYPE == "local"


def test_bulk_pipeline_start_reports_the_variable_not_a_pydantic_error(tmp_path: Path) -> None:
    env = {**os.environ, "STORAGE_TYPE": "s3", "RAY_AUTH_MODE": "disabled",
           "STORAGE_BASE_PATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.batch_transcribe", "--input", str(tmp_path / "none"),
         "--output", str(tmp_path / "out.jsonl")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr  # a configuration error, said before any file is read
    assert "STORAGE_TYPE='s3' is not supported; supported values: local" in done.stderr, done.stderr
    assert "validation error for Settings" not in done.stderr and "pydantic" not in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out.jsonl").exists()
