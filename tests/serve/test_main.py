"""`python -m serve` up to the point where it starts Ray, without starting it (issue 13).

- Bug 4: the serve config's `runtime_env.env_vars` are defaults; what the operator set in the
  environment (AI_DEVICE, WHISPER_MODEL_PATH, ...) is what the replicas get.
- Bug 10: an unsupported STORAGE_TYPE stops it at once with a message naming the variable and
  the supported values, not a pydantic traceback, and before any Ray is started.
- Bug 7: a build without serve.jobs_api fails at start instead of running without auth.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve import __main__ as serve_main
from serve.__main__ import replica_env

REPO = Path(__file__).resolve().parents[2]
PINNED = {"AI_DEVICE": "cpu", "WHISPER_MODEL_PATH": "tiny.en", "DIARIZATION_MODEL_PATH": "packaged"}
"""What a config may pin for the replicas; each is also a Settings name the operator may set."""


class _RayStarted(Exception):
    """Raised by the fake `ray.init`: the test has what it came for."""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """An environment without the pinned names, fresh settings before and after, and a storage
    folder of the test's own. main() writes os.environ itself, so the whole environment is put
    back afterwards (monkeypatch alone restores only the names it touched)."""
    import os

    from config.settings import get_settings

    saved = dict(os.environ)
    for name in (*PINNED, "STORAGE_TYPE", "STORAGE_BASE_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORAGE_BASE_PATH", str(tmp_path / "storage"))
    get_settings.cache_clear()
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)
    get_settings.cache_clear()


def _config(tmp_path: Path, env_vars: dict[str, str]) -> Path:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["applications"][0]["runtime_env"] = {"env_vars": env_vars}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fake_ray(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Stop main at `ray.init`, keeping its arguments; no database, no logging set-up, no
    application graph (serve.app and its deployments are not what these tests are about)."""
    import types

    import ray

    import config.logging_setup

    seen: dict[str, Any] = {}

    def init(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _RayStarted

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(config.logging_setup, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(serve_main, "_prepare_database", lambda: None)
    monkeypatch.setitem(sys.modules, "serve.app", types.SimpleNamespace(build_from_config=None))
    return seen


# ---------------------------------------------------------------- bug 4: the operator's env wins
def test_environment_wins_over_the_config_for_every_name_it_sets() -> None:
    environ = {"AI_DEVICE": "cuda", "WHISPER_MODEL_PATH": "/models/large", "UNRELATED": "x"}
    assert replica_env(PINNED, environ) == {
        "AI_DEVICE": "cuda", "WHISPER_MODEL_PATH": "/models/large", "DIARIZATION_MODEL_PATH": "packaged"}


def test_config_values_stay_the_defaults() -> None:
    assert replica_env(PINNED, {}) == PINNED
    assert replica_env({"AUDIO_MAX_FILE_SIZE": 1000, "WEBHOOK_ALLOW_INTERNAL": True}, {}) == {
        "AUDIO_MAX_FILE_SIZE": "1000", "WEBHOOK_ALLOW_INTERNAL": "True"}, "Ray wants strings"


def test_the_shipped_cpu_profile_runs_on_the_shell_s_device() -> None:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config_env = config["applications"][0]["runtime_env"]["env_vars"]
    assert config_env["AI_DEVICE"] == "cpu"
    assert replica_env(config_env, {"AI_DEVICE": "cuda"})["AI_DEVICE"] == "cuda"
    assert replica_env(config_env, {})["AI_DEVICE"] == "cpu"


def test_main_gives_the_replicas_the_shell_s_settings(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("AI_DEVICE", "cuda")
    clean_env.setenv("WHISPER_MODEL_PATH", "base")
    seen = _fake_ray(clean_env)
    with pytest.raises(_RayStarted):
        serve_main.main(["--config", str(_config(tmp_path, PINNED))])
    env_vars = seen["runtime_env"]["env_vars"]
    assert env_vars["AI_DEVICE"] == "cuda" and env_vars["WHISPER_MODEL_PATH"] == "base"
    assert env_vars["DIARIZATION_MODEL_PATH"] == "packaged", "unset: the config's default"
    assert env_vars["STORAGE_BASE_PATH"] == str((tmp_path / "storage").resolve())


def test_main_runs_itself_on_the_config_defaults_it_gives_the_replicas(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from config.settings import get_settings

    seen = _fake_ray(clean_env)
    with pytest.raises(_RayStarted):
        serve_main.main(["--config", str(_config(tmp_path, {**PINNED, "WHISPER_MODEL_PATH": "base"}))])
    assert seen["runtime_env"]["env_vars"]["WHISPER_MODEL_PATH"] == "base"
    assert get_settings().WHISPER_MODEL_PATH == "base", "the migrating process sees what replicas see"


# ---------------------------------------------------------------- bug 10: STORAGE_TYPE refused
def test_unsupported_storage_type_stops_it_with_a_clear_message(
        clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("STORAGE_TYPE", "s3")
    seen = _fake_ray(clean_env)
    assert serve_main.main(["--config", str(_config(tmp_path, PINNED))]) == 2
    err = capsys.readouterr().err
    assert "STORAGE_TYPE='s3' is not supported; supported values: local" in err
    assert "validation error" not in err and "Traceback" not in err
    assert not seen, "nothing was started"


# ---------------------------------------------------------------- bug 7: fail closed
def test_missing_jobs_api_fails_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a build without the module that migrates and makes the key looks like (it is moving
    # from serve.jobs_api to serve.job_records: block both).
    for name in ("serve.jobs_api", "serve.job_records"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModuleNotFoundError):
        serve_main._prepare_database()
