"""Windows of concurrent requests are transcribed in shared batches (the replica's own record)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ray import serve

from speech.evaluation import word_error_rate
from tests.serve.support import SHORT_CLIPS, reference

CONCURRENT = 16


def test_sixteen_concurrent_requests_share_batches(service, openai_client) -> None:  # noqa: ANN001
    asr = serve.get_deployment_handle("ASRDeployment", service.app_name)
    before = len(asr.batch_stats.remote().result()["batches"])
    clips = [SHORT_CLIPS[i % len(SHORT_CLIPS)] for i in range(CONCURRENT)]

    def send(path):  # noqa: ANN001, ANN202
        with open(path, "rb") as f:
            return openai_client.audio.transcriptions.create(file=(path.name, f), model="whisper-1")

    with ThreadPoolExecutor(CONCURRENT) as pool:
        texts = [r.text for r in pool.map(send, clips)]

    wer = word_error_rate([reference(p) for p in clips], texts)
    assert wer <= 0.15, f"WER {wer:.2f}: {texts}"
    stats = asr.batch_stats.remote().result()
    assert stats["max_batch_size"] == 16  # from user_config, applied by reconfigure()
    batches = stats["batches"][before:]
    assert sum(b["batch_size"] for b in batches) == CONCURRENT, batches  # one window per clip
    shared = [b for b in batches if b["requests"] >= 2]
    assert shared, f"every batch held a single request: {batches}"
    assert max(b["batch_size"] for b in batches) >= 4, batches
