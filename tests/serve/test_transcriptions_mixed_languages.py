"""Requests in different languages, without `language=`, share the ASR replica's batches.

Requests that do not name a language have the same options, so the replica batches their windows
together; each window must still be decoded after its own detected language token. A second
application on the session's cluster serves the multilingual `base` model (ASR and ingress only,
under its own route prefix; deleted at the end of the module). German, English and French clips
(one window each) are first sent one at a time, then several copies of each at once: every
concurrent response (verbose_json) must carry the language and the text, segment for segment, of
the same clip sent alone, and the replica's batch record must show a batch that held windows of
two or more of the languages.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from ray import serve

from tests.conftest import MIXED_LANGUAGE_CLIPS
from tests.conftest import SPEECH_DATA_DIR as DATA
from tests.serve.support import Service

APP = "speech-multilingual-test"
PREFIX = "/multilingual"
NAMES = {"de": "german", "en": "english", "fr": "french"}
COPIES = 2
"""Concurrent requests per clip in a round: with six windows in flight, those that arrive while a
batch computes go together into the next one, whatever the arrival times."""
ROUNDS = 3
"""Rounds sent at most until one batch held two languages (the first does, in practice)."""
TIMEOUT_S = 300


def _app_config(storage: str) -> dict[str, Any]:
    return {
        "name": APP,
        "args": {"whisper_model": "base", "diarization": False, "jobs": False,
                 # no shedding: the concurrent round must be answered, not refused with a 503
                 "ingress": {"storage_base_path": storage, "queue_timeout_s": None}},
        "deployments": [
            {"name": "Ingress", "ray_actor_options": {"num_cpus": 0}},
            # no CPU reserved (the session's replicas hold the cluster's two); one torch thread
            {"name": "ASRDeployment", "ray_actor_options": {"num_cpus": 0},
             "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": 0.5}},
        ],
    }


@pytest.fixture(scope="module")
def multilingual(service: Service, base_model_dir) -> Iterator[Service]:  # noqa: ANN001
    """The `base` model behind the production ingress, beside the session's application."""
    from serve.app import build_from_config

    serve.run(build_from_config(_app_config(str(service.storage))), name=APP, route_prefix=PREFIX)
    try:
        ml = Service(base_url=service.base_url + PREFIX, storage=service.storage, app_name=APP,
                     api_key=service.api_key)
        deadline = time.monotonic() + 120
        while (ready := httpx.get(ml.url("/ready"), timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, f"the multilingual application never became ready: {ready.text}"
            time.sleep(1)
        assert ready.json()["checks"]["asr"]["model"] == "base"
        yield ml
    finally:
        serve.delete(APP)


def _send(svc: Service, lang: str, tag: str) -> dict[str, Any]:
    path = DATA / MIXED_LANGUAGE_CLIPS[lang]
    with path.open("rb") as fh:
        response = httpx.post(svc.url("/v1/audio/transcriptions"), timeout=TIMEOUT_S,
                              headers={**svc.auth, "X-Request-ID": tag}, files={"file": (path.name, fh)},
                              data={"model": "whisper-1", "response_format": "verbose_json"})
    assert response.status_code == 200, response.text
    return response.json()


def _comparable(body: dict[str, Any]) -> tuple:
    return body["language"], body["text"], [(s["start"], s["end"], s["text"]) for s in body["segments"]]


def _batches() -> list[dict[str, Any]]:
    return serve.get_deployment_handle("ASRDeployment", APP).batch_stats.remote().result()["batches"]


def _tag(kind: str, lang: str) -> str:
    return f"{kind}-{lang}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def alone(multilingual: Service) -> dict[str, dict[str, Any]]:
    """Each clip sent on its own (one after another), with its request tag."""
    out = {}
    for lang in MIXED_LANGUAGE_CLIPS:
        tag = _tag("alone", lang)
        out[lang] = {"tag": tag, "body": _send(multilingual, lang, tag)}
    return out


def test_each_clip_alone_is_its_own_batch_in_its_detected_language(alone) -> None:  # noqa: ANN001
    batches = _batches()
    for lang, sent in alone.items():
        body = sent["body"]
        assert body["language"] == NAMES[lang], body
        assert list(body["language_probs"])[0] == lang and body["text"].strip(), body
        mine = [b for b in batches if any(t == sent["tag"] for t, _ in b["windows"])]
        assert [(b["batch_size"], b["requests"]) for b in mine] == [(1, 1)], mine  # one window, alone


def test_concurrent_requests_in_three_languages_share_batches_and_equal_each_alone(
        multilingual: Service, alone) -> None:  # noqa: ANN001
    def send_at_once(sends: list[tuple[str, str]]) -> list[dict[str, Any]]:
        start = threading.Barrier(len(sends))

        def go(item: tuple[str, str]) -> dict[str, Any]:
            start.wait(timeout=60)
            return _send(multilingual, *item)

        with ThreadPoolExecutor(len(sends)) as pool:
            return list(pool.map(go, sends))

    language_of: dict[str, str] = {}
    answers: list[tuple[str, dict[str, Any]]] = []
    mixed: list[dict[str, Any]] = []
    for _ in range(ROUNDS):
        sends = [(lang, _tag("mixed", lang)) for _ in range(COPIES) for lang in MIXED_LANGUAGE_CLIPS]
        language_of.update((tag, lang) for lang, tag in sends)
        answers += [(lang, body) for (lang, _), body in zip(sends, send_at_once(sends), strict=True)]
        mixed = [b for b in _batches()
                 if len({language_of[t] for t, _ in b["windows"] if t in language_of}) >= 2]
        if mixed:
            break

    mine = [b for b in _batches() if any(t in language_of for t, _ in b["windows"])]
    assert mixed, f"no batch held windows of two languages in {ROUNDS} rounds: {mine}"
    print(f"batches of the concurrent rounds (size, requests): {[(b['batch_size'], b['requests']) for b in mine]}")
    for lang, body in answers:
        assert _comparable(body) == _comparable(alone[lang]["body"]), (lang, body, alone[lang]["body"])
        assert body["language_probs"][lang] == pytest.approx(alone[lang]["body"]["language_probs"][lang], abs=1e-3)
