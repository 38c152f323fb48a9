"""One real application on a private local Ray cluster for the whole session.

The graph is the production one (`serve.app.build_from_config`) with the packaged tiny.en model
and the packaged diarization models; only sizes change: a small upload cap so the 413 tests stay
cheap, and ASR queue limits small enough that an overload test can fill them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

DATA = Path("/work/shared/data/speech")
APP_NAME = "speech-test"
MAX_UPLOAD_BYTES = 3 * 1024 * 1024
ASR_MAX_ONGOING = 16
ASR_MAX_QUEUED = 16


@dataclass(frozen=True)
class Service:
    base_url: str
    storage: Path
    app_name: str

    def url(self, path: str) -> str:
        return self.base_url + path

    def stored_files(self) -> list[Path]:
        """Every file the service left in storage (audio and temporary uploads)."""
        return [p for p in self.storage.rglob("*") if p.is_file()]

    def openai(self, **kwargs: object):  # noqa: ANN201 - openai.OpenAI
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0,
                             timeout=300, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
             "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": 0.1},
             "ray_actor_options": {"num_cpus": 1}},
            {"name": "DiarizationDeployment", "ray_actor_options": {"num_cpus": 0}},
        ],
    }


test_app_config.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    os.environ["RAY_AUTH_MODE"] = "disabled"  # explicit: Ray 2.60 turns token auth on otherwise
    import ray
    from ray import serve

    from serve.app import build_from_config

    storage = tmp_path_factory.mktemp("storage")
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=512 * 1024 * 1024, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_from_config(test_app_config(storage)), name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(base + "/ready", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(1)
        yield Service(base_url=base, storage=storage, app_name=APP_NAME)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def openai_client(service: Service):  # noqa: ANN201
    return service.openai()


def reference(path: Path) -> str:
    return path.with_suffix(".txt").read_text()


JFK = DATA / "jfk" / "jfk.flac"
LIBRI = DATA / "lhotse_fixtures" / "2412-153948-0000.flac"
SHORT_CLIPS = sorted((DATA / "pocketsphinx" / "librivox").glob("*.wav"))
"""Five LibriVox utterances of 3-7 s: short, real, with references."""
