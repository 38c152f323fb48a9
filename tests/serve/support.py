"""What the serve tests share: the test application's configuration, the running service's
address, and the real clips with their references.

The application is the production graph (`serve.app.build_from_config`) with the packaged
tiny.en model and the packaged diarization models; only sizes change: a small upload cap so the
413 tests stay cheap, and ASR queue limits small enough that an overload test can fill them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import SPEECH_DATA_DIR as DATA

APP_NAME = "speech-test"
MAX_UPLOAD_BYTES = 3 * 1024 * 1024
ASR_MAX_ONGOING = 16
ASR_MAX_QUEUED = 16


@dataclass(frozen=True)
class Service:
    base_url: str
    storage: Path
    app_name: str
    api_key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def url(self, path: str) -> str:
        return self.base_url + path

    def stored_files(self) -> list[Path]:
        """Audio and temporary uploads the service left in storage (not its database)."""
        return [p for p in self.storage.rglob("*")
                if p.is_file() and p.parent != self.storage]

    def openai(self, **kwargs: object):  # noqa: ANN201 - openai.OpenAI
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0,
                             timeout=300, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_file(storage: Path) -> Path:
    """The service's JSON log file (LOG_FILE) beside its storage, not in it (stored_files)."""
    return storage.with_name(storage.name + "-logs") / "service.log"


def service_env(storage: Path) -> dict[str, str]:
    """Settings of the test cluster: its own storage (and SQLite database), no rate limits
    (the tests send more than 100 requests a minute from one address), a job runner replica
    that runs no claim loops (JOB_RUNNER_CONCURRENCY=0: jobs stay queued), and
    its JSON logs in a file of its own (`log_file`), which the log tests read."""
    return {"STORAGE_BASE_PATH": str(storage), "RATE_LIMIT_PER_MINUTE": "0",
            "RATE_LIMIT_KEY_PER_MINUTE": "0", "JOB_RUNNER_CONCURRENCY": "0",
            "ENVIRONMENT": "test", "LOG_FILE": str(log_file(storage))}


def create_local_key(env: dict[str, str]) -> str:
    """Migrate the test database and create the embedded default's local key, with `env` as
    the settings only for the duration of the call."""
    import os

    from config.settings import get_settings
    from serve.job_records import prepare_database

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        key = prepare_database()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()
    assert key, "the embedded default created no local key"
    return key


def test_app_config(storage: Path) -> dict:
    """The serve config application entry the tests run."""
    return {
        "name": APP_NAME,
        "args": {"ingress": {"max_upload_bytes": MAX_UPLOAD_BYTES,
                             "storage_base_path": str(storage)}},
        "deployments": [
            {"name": "Ingress", "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0}},
            {"name": "ASRDeployment", "max_ongoing_requests": ASR_MAX_ONGOING,
             "max_queued_requests": ASR_MAX_QUEUED,
             "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": 0.1, "threads_when_alone": 2},
             "ray_actor_options": {"num_cpus": 1}},
            {"name": "DiarizationDeployment", "ray_actor_options": {"num_cpus": 0}},
            {"name": "JobRunnerDeployment", "ray_actor_options": {"num_cpus": 0}},
        ],
    }


test_app_config.__test__ = False  # a helper, not a test


def reference(path: Path) -> str:
    return path.with_suffix(".txt").read_text()


JFK = DATA / "jfk" / "jfk.flac"
LIBRI = DATA / "lhotse_fixtures" / "2412-153948-0000.flac"
SHORT_CLIPS = sorted((DATA / "pocketsphinx" / "librivox").glob("*.wav"))
"""Five LibriVox utterances of 3-7 s: short, real, with references."""
