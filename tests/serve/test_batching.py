"""Batches form when the model is free (serve/batching.py), and windows of concurrent requests
are transcribed in shared batches (the replica's own record)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from ray import serve

from serve.batching import MicroBatcher
from speech.evaluation import word_error_rate
from tests.serve.support import SHORT_CLIPS, reference

CONCURRENT = 16
HANG_GUARD_S = 60
"""Only so that a broken batcher fails instead of hanging the suite; nothing is timed."""


class Model:
    """Records each batch; the first batch can be held until released."""

    def __init__(self, *, hold_first: bool = False, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not hold_first:
            self.release.set()
        self.fail_on = fail_on

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        if self.fail_on in items:
            raise ValueError(f"cannot decode {self.fail_on}")
        return [item.upper() for item in items]


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, HANG_GUARD_S))


def test_what_arrives_while_a_batch_computes_goes_together_into_the_next() -> None:
    async def scenario() -> list[list[str]]:
        model = Model(hold_first=True)
        batcher = MicroBatcher(model, max_batch_size=16, batch_wait_timeout_s=0.0)
        first = asyncio.ensure_future(batcher.submit("a"))
        await model.started.wait()
        later = [asyncio.ensure_future(batcher.submit(x)) for x in "bcdefghijk"]
        for _ in range(20):  # arrivals spread over many loop turns, as from many callers
            await asyncio.sleep(0)
        assert batcher.waiting == 10
        model.release.set()
        assert await first == "A"
        assert await asyncio.gather(*later) == list("BCDEFGHIJK")  # each caller its own result
        return model.batches

    assert run(scenario()) == [["a"], list("bcdefghijk")]


def test_a_batch_never_exceeds_max_batch_size() -> None:
    async def scenario() -> list[int]:
        model = Model(hold_first=True)
        batcher = MicroBatcher(model, max_batch_size=8, batch_wait_timeout_s=0.0)
        first = asyncio.ensure_future(batcher.submit("first"))
        await model.started.wait()
        later = [asyncio.ensure_future(batcher.submit(f"w{i}")) for i in range(20)]
        await asyncio.sleep(0)
        model.release.set()
        await asyncio.gather(first, *later)
        return [len(b) for b in model.batches]

    assert run(scenario()) == [1, 8, 8, 4]


def test_an_idle_model_takes_a_full_batch_without_waiting_out_the_timeout() -> None:
    async def scenario() -> list[list[str]]:
        model = Model()
        batcher = MicroBatcher(model, max_batch_size=3, batch_wait_timeout_s=3600)
        assert await asyncio.gather(*(batcher.submit(x) for x in "xyz")) == ["X", "Y", "Z"]
        return model.batches

    assert run(scenario()) == [["x", "y", "z"]]


def test_a_lone_caller_never_waits_for_company() -> None:
    async def scenario() -> list[list[str]]:
        model = Model()
        batcher = MicroBatcher(model, max_batch_size=16, batch_wait_timeout_s=3600)
        for x in "pqr":  # one after another, as one client: each goes at once
            await batcher.submit(x)
        return model.batches

    assert run(scenario()) == [["p"], ["q"], ["r"]]


def test_the_next_batch_waits_for_as_many_as_were_in_play_during_the_last() -> None:
    async def scenario() -> list[list[str]]:
        model = Model(hold_first=True)
        batcher = MicroBatcher(model, max_batch_size=16, batch_wait_timeout_s=3600)
        first = asyncio.ensure_future(batcher.submit("a"))
        await model.started.wait()
        queued = [asyncio.ensure_future(batcher.submit(x)) for x in "bc"]
        await asyncio.sleep(0)
        model.release.set()
        assert await first == "A"  # 3 were in play during that batch: a, b and c ...
        for _ in range(20):
            await asyncio.sleep(0)
        assert model.batches == [["a"]]  # ... so b and c wait for a third
        returning = asyncio.ensure_future(batcher.submit("a2"))  # a's caller, back with its next
        await asyncio.gather(returning, *queued)
        return model.batches

    assert run(scenario()) == [["a"], ["b", "c", "a2"]]


def test_waiting_for_company_ends_at_the_timeout() -> None:
    async def scenario() -> list[list[str]]:
        model = Model(hold_first=True)
        batcher = MicroBatcher(model, max_batch_size=16, batch_wait_timeout_s=0.05)
        first = asyncio.ensure_future(batcher.submit("a"))
        await model.started.wait()
        later = asyncio.ensure_future(batcher.submit("b"))
        await asyncio.sleep(0)
        model.release.set()
        await asyncio.gather(first, later)  # b goes without the second caller it waited for
        return model.batches

    assert run(scenario()) == [["a"], ["b"]]


def test_a_failed_batch_fails_its_callers_and_the_next_batch_runs() -> None:
    async def scenario() -> tuple[list[object], str]:
        model = Model(hold_first=True, fail_on="bad")
        batcher = MicroBatcher(model, max_batch_size=4, batch_wait_timeout_s=0.0)
        failing = [asyncio.ensure_future(batcher.submit(x)) for x in ("ok", "bad")]
        await model.started.wait()
        model.release.set()
        outcomes = await asyncio.gather(*failing, return_exceptions=True)
        return outcomes, await batcher.submit("next")

    outcomes, after = run(scenario())
    assert [type(o) for o in outcomes] == [ValueError, ValueError]
    assert after == "NEXT"


def test_a_caller_that_left_before_its_batch_started_is_not_computed() -> None:
    async def scenario() -> list[list[str]]:
        model = Model(hold_first=True)
        batcher = MicroBatcher(model, max_batch_size=16, batch_wait_timeout_s=0.0)
        first = asyncio.ensure_future(batcher.submit("a"))
        await model.started.wait()
        gone = asyncio.ensure_future(batcher.submit("gone"))
        stays = asyncio.ensure_future(batcher.submit("stays"))
        await asyncio.sleep(0)
        gone.cancel()
        model.release.set()
        await asyncio.gather(first, stays)
        return model.batches

    assert run(scenario()) == [["a"], ["stays"]]


def test_limits_are_checked() -> None:
    batcher = MicroBatcher(Model(), max_batch_size=1, batch_wait_timeout_s=0)
    with pytest.raises(ValueError):
        batcher.configure(max_batch_size=0, batch_wait_timeout_s=0)


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
    # the spare core goes to a batch only while no other request is in flight at the replica
    # and the rest of the machine was idle during the batch before
    for b in batches:
        assert b["in_flight_requests"] >= b["requests"], b
        assert b["threads"] == (2 if _may_borrow(b) else 1), b


def _may_borrow(batch: dict) -> bool:
    others = batch["others_cores_before"]
    return batch["requests"] == batch["in_flight_requests"] and others is not None and others < 0.5


def test_a_lone_request_on_an_idle_machine_is_decoded_with_the_spare_threads(service, openai_client) -> None:  # noqa: ANN001
    """`threads_when_alone` (2 in the test config, one CPU for the replica): nothing else is in
    flight and the machine was idle during the batch before, so the model may use the core the
    rest of the service is not using."""
    asr = serve.get_deployment_handle("ASRDeployment", service.app_name)
    before = len(asr.batch_stats.remote().result()["batches"])
    paths, texts = SHORT_CLIPS[:3], []
    for path in paths:  # one after another: each batch measures the machine for the next
        with open(path, "rb") as f:
            texts.append(openai_client.audio.transcriptions.create(file=(path.name, f), model="whisper-1").text)
    assert word_error_rate([reference(p) for p in paths], texts) <= 0.15, texts
    stats = asr.batch_stats.remote().result()
    assert stats["threads_when_alone"] == 2
    batches = stats["batches"][before:]
    assert [(b["requests"], b["in_flight_requests"]) for b in batches] == [(1, 1)] * 3, batches
    for b in batches:
        assert b["threads"] == (2 if _may_borrow(b) else 1), b
    assert any(b["threads"] == 2 for b in batches[1:]), batches
