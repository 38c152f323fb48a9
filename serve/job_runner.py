"""The job runner: claims queued jobs under a lease, transcribes them, stores results once.

Transcription is `speech.pipeline.TranscriptionPipeline`, the sequence every entry point runs,
obtained from an injected async factory: inside Serve it runs on the model deployments' handles
(serve/model_calls.py; job windows share batches with synchronous requests), in a standalone
process (`python -m serve.job_runner`) on engines loaded here, diarizer included. Database calls
run in threads, never on the loop.

Guarantees (see db/repository.py): a job whose runner dies is claimed again when its lease expires,
at most JOB_MAX_ATTEMPTS times; only the current lease owner may write results, and writing replaces
what an earlier attempt wrote. A job whose options or audio cannot succeed fails on its first
attempt with the reason's code; only what may be transient is retried.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from config.settings import get_settings
from db import repository as repo
from db.models import TERMINAL_STATUSES, Job, utcnow
from db.session import get_sessionmaker
from serve import job_events, webhooks
from serve.storage import delete_audio
from serve.errors import ApiError, OverloadedError, is_database_unavailable
from speech.errors import SpeechError
from speech.pipeline import OnWindow, TranscriptionPipeline, WindowDone
from speech.request import TranscriptionRequest
from speech.types import Transcript

log = logging.getLogger(__name__)


class Transcribes(Protocol):
    """What the runner needs of `speech.pipeline.TranscriptionPipeline`."""

    async def run(self, request: TranscriptionRequest, source: Path, *,
                  on_window: OnWindow | None = None) -> Transcript: ...


PipelineFactory = Callable[[], Awaitable[Transcribes]]
"""Async: the pipeline to run a job with (Serve: built on the handles once the models answer)."""


class _Progress:
    """A job's fraction done, stepped once per finished window; each step is kept until the
    heartbeat loop has written and published it."""

    def __init__(self) -> None:
        self.value = 0.0
        self.changed = asyncio.Event()
        self._steps: list[float] = []

    def step(self, value: float) -> None:
        self.value = max(self.value, value)
        self._steps.append(self.value)
        self.changed.set()

    def take(self) -> list[float]:
        steps, self._steps = self._steps, []
        self.changed.clear()
        return steps


WEBHOOK_STALE_S = 300.0
"""A webhook still pending this long after its job's last update lost its sender: resend it."""


STOP_WRITE_TIMEOUT_S = 10.0
"""How long `JobRunner.stop()` waits for results being written (within Serve's
graceful_shutdown_timeout_s, 20 s by default)."""


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobRunner:
    """Runs `concurrency` claim loops on the current event loop until stopped."""

    def __init__(
        self,
        pipeline: PipelineFactory,
        *,
        owner: str | None = None,
        concurrency: int = 1,
        lease_s: float | None = None,
        heartbeat_s: float | None = None,
        poll_s: float | None = None,
        db_url: str | None = None,
        delete_audio: Callable[[str], None] | None = None,
    ) -> None:
        s = get_settings()
        self.pipeline = pipeline
        self.events = job_events.Publisher()
        self.owner = owner or default_owner()
        self.concurrency = concurrency
        self.lease_s = lease_s or s.JOB_LEASE_S
        self.heartbeat_s = heartbeat_s or min(s.JOB_HEARTBEAT_S, self.lease_s / 3)
        self.poll_s = poll_s or s.JOB_POLL_S
        self.retention = timedelta(days=s.JOB_RETENTION_DAYS)
        self._sessions = get_sessionmaker(db_url)
        self._delete_audio = delete_audio
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.processed = 0
        """Jobs this runner finished (any terminal status): a count, so a long-lived replica
        does not keep every job id it ever ran."""
        self._held: set[str] = set()
        """Ids of the jobs whose model call is in progress (claimed, result not yet written)."""
        self._writes: set[asyncio.Task[Any]] = set()
        """Results and releases being written (`_db_retrying`): `stop()` lets them land."""

    async def _db(self, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        def call() -> Any:
            with self._sessions() as session:
                return fn(session=session, **kwargs)

        return await asyncio.to_thread(call)

    async def _db_retrying(self, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        """A write that must outlive a database outage (a finished job's result or release):
        retried with backoff while the database is unreachable, until it lands or the runner
        stops. If the lease expired meanwhile and another runner took the job, the write finds
        the job no longer ours and says so: the result is discarded, never written twice.

        It is not cancelled with its caller: `stop()` waits for it, so a result computed before
        a stop is kept rather than computed again after the lease expires."""
        write = asyncio.ensure_future(self._write_retrying(fn, **kwargs))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        return await asyncio.shield(write)

    async def _write_retrying(self, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        delay = min(self.poll_s, 1.0)
        while True:
            try:
                return await self._db(fn, **kwargs)
            except Exception as exc:
                if not is_database_unavailable(exc) or self._stop.is_set():
                    raise
                log.warning("database unavailable; retrying", extra={
                    "runner": self.owner, "op": fn.__name__, "error": type(exc).__name__})
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.heartbeat_s)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the claim loops as tasks of the running event loop (e.g. in the JobRunnerDeployment
        replica, serve/job_runner_deployment.py)."""
        self._stop.clear()
        self._loops = [asyncio.create_task(self._loop(i)) for i in range(self.concurrency)]
        self._loops.append(asyncio.create_task(self._housekeeping()))

    @property
    def running(self) -> list[str]:
        """Ids of the jobs this runner is working on now."""
        return sorted(self._held)

    def failure(self) -> str | None:
        """Why this started runner no longer works (one of its loops ended although it was not
        stopped), or None while it works (or was never started, or was stopped)."""
        if self._stop.is_set():
            return None
        for task in self._loops:
            if task.done():
                error = None if task.cancelled() else task.exception()
                return f"{task.get_coro().__qualname__} ended: {error!r}"
        return None

    async def stop(self, *, release: bool = False) -> None:
        """Stop claiming and cancel the model calls in flight. Their jobs are abandoned and claimed
        again when their leases expire, or with `release` handed back to the queue at once (the
        attempt counted, as after a crash; a job on its last attempt ends failed)."""
        held = set(self._held)  # before cancelling: no job in it gets its result written after
        self._stop.set()
        for task in self._loops + list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        if self._writes:  # results already computed: let them land (one try once stopped)
            try:
                await asyncio.wait_for(asyncio.gather(*self._writes, return_exceptions=True),
                                       timeout=STOP_WRITE_TIMEOUT_S)
            except TimeoutError:
                log.warning("results not written before the stop; their jobs are claimed again",
                            extra={"runner": self.owner})
        await self.events.close()  # after the last results (and their events) went out
        if not release:
            return
        for job_id in sorted(held):
            try:
                status = await self._db(repo.release_job, job_id=job_id, owner=self.owner,
                                        error="runner stopped; requeued", retry=True)
            except Exception as exc:  # noqa: BLE001 - the lease expires anyway
                log.warning("job not released; it is claimed again when its lease expires",
                            extra={"job_id": job_id, "runner": self.owner,
                                   "error": type(exc).__name__})
                continue
            if status is not None:
                log.info("job released on stop", extra={"job_id": job_id, "status": status,
                                                         "runner": self.owner})

    async def run_until_stopped(self) -> None:
        self.start()
        await self._stop.wait()
        await self.stop()

    async def _loop(self, index: int) -> None:
        while not self._stop.is_set():
            try:
                worked = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a DB outage must not kill the loop
                if is_database_unavailable(exc):
                    log.warning("runner: database unavailable; retrying",
                                extra={"runner": self.owner, "error": type(exc).__name__})
                else:
                    log.exception("runner loop error; retrying", extra={"runner": self.owner})
                worked = None
            if worked is None:
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=self.poll_s)
                except TimeoutError:
                    pass

    async def _housekeeping(self) -> None:
        while not self._stop.is_set():
            try:
                failed = await self._db(repo.fail_exhausted_jobs)
                for job_id in failed:
                    log.warning("job failed: attempts exhausted", extra={"job_id": job_id})
                    self._spawn(self._send_webhook(job_id))
                orphans = await self._db(repo.purge_finished, older_than=utcnow() - self.retention)
                for sha in orphans:
                    self._remove_audio(sha)
                for job_id in await self._db(repo.claim_stale_webhooks, stale_after_s=WEBHOOK_STALE_S):
                    self._spawn(self._send_webhook(job_id))
                publish_queue_gauges(await self._db(repo.queue_stats))
            except Exception:  # noqa: BLE001
                log.exception("housekeeping error")
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=max(self.lease_s / 2, 1.0))
            except TimeoutError:
                pass

    def _remove_audio(self, sha256: str) -> None:
        (self._delete_audio or delete_audio)(sha256)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ one job

    async def run_once(self) -> str | None:
        """Claim and process one job; returns its id, or None when the queue is empty."""
        job: Job | None = await self._db(repo.claim_next_job, owner=self.owner, lease_s=self.lease_s)
        if job is None:
            return None
        await self._process(job)
        return job.id

    async def _process(self, job: Job) -> None:
        log.info("job claimed", extra={"job_id": job.id, "attempt": job.attempts, "runner": self.owner})
        await self.events.publish(job.id, {"status": "running", "progress": 0.0, "attempts": job.attempts})
        progress = _Progress()

        def on_window(done: WindowDone) -> None:  # written and published by the heartbeat loop
            progress.step((done.index + 1) / done.total)

        request = TranscriptionRequest.from_dict(job.options or {})
        work = asyncio.ensure_future(self._transcribe(request, Path(job.audio_path or ""), on_window))
        self._held.add(job.id)
        try:
            if not await self._heartbeat(job, work, progress):
                return
        finally:
            self._held.discard(job.id)
            if not work.done():  # stopped, cancelled or lease lost: no orphaned model call
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        try:
            transcript = work.result()
        except OverloadedError:  # backpressure: not the job's fault, so the attempt is not counted
            status = await self._db_retrying(repo.release_job, job_id=job.id, owner=self.owner,
                                             error="model overloaded; requeued", retry=True, refund_attempt=True)
            await asyncio.sleep(self.poll_s)
        except SpeechError as exc:  # bad options or audio: retrying cannot help
            status = await self._fail(job, f"{exc.code}: {exc}")
        except ApiError as exc:
            if 400 <= exc.status_code < 500:  # the replica refused the request itself
                status = await self._fail(job, f"{exc.code or exc.status_code}: {exc.message}")
            else:
                status = await self._retry(job, exc)
        except FileNotFoundError:  # audio deleted (job deleted, retention): nothing to retry
            status = await self._fail(job, "audio_missing: the job's audio is no longer stored")
        except Exception as exc:  # noqa: BLE001 - anything else may be transient: retry
            status = await self._retry(job, exc)
        else:
            ok = await self._db_retrying(repo.complete_job, job_id=job.id, owner=self.owner, transcript=transcript)
            status = "succeeded" if ok else None
        await self._finish(job, status)

    async def _transcribe(self, request: TranscriptionRequest, audio: Path,
                          on_window: OnWindow) -> Transcript:
        pipeline = await self.pipeline()
        return await pipeline.run(request, audio, on_window=on_window)

    async def _fail(self, job: Job, error: str) -> str | None:
        return await self._db_retrying(repo.release_job, job_id=job.id, owner=self.owner,
                                       error=error[:2000], retry=False)

    async def _retry(self, job: Job, exc: BaseException) -> str | None:
        log.warning("job attempt failed", extra={"job_id": job.id, "error": type(exc).__name__})
        return await self._db_retrying(repo.release_job, job_id=job.id, owner=self.owner,
                                       error=f"{type(exc).__name__}: {exc}"[:2000], retry=True)

    async def _heartbeat(self, job: Job, work: asyncio.Future[Any], progress: _Progress) -> bool:
        """Renew the lease every heartbeat, and at once when a window finished (progress is
        written and published per window), until `work` is done; False when the lease was lost
        or the job cancelled. A heartbeat the database cannot take (it is restarting) is
        skipped, not fatal: the work goes on, and the lease is renewed at the next one that lands."""
        while True:
            stepped = asyncio.ensure_future(progress.changed.wait())
            done, _ = await asyncio.wait({work, stepped}, timeout=self.heartbeat_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            stepped.cancel()
            steps = progress.take()
            if work in done:
                await self._publish_steps(job, steps)
                return True
            try:
                renewed = await self._db(repo.renew_lease, job_id=job.id, owner=self.owner,
                                         lease_s=self.lease_s, progress=progress.value)
            except Exception as exc:
                if not is_database_unavailable(exc):
                    raise
                log.warning("heartbeat failed: database unavailable", extra={
                    "job_id": job.id, "runner": self.owner, "error": type(exc).__name__})
                continue
            if not renewed:
                log.info("job cancelled or lease lost; result discarded", extra={"job_id": job.id})
                return False
            await self._publish_steps(job, steps)

    async def _publish_steps(self, job: Job, steps: list[float]) -> None:
        for value in steps:
            await self.events.publish(job.id, {"status": "running", "progress": value,
                                               "attempts": job.attempts})

    async def _finish(self, job: Job, status: str | None) -> None:
        if status is None:
            log.info("job no longer ours; result discarded", extra={"job_id": job.id})
            return
        await self.events.publish(job.id, {"status": status, "attempts": job.attempts,
                                           **({"progress": 1.0} if status == "succeeded" else {})})
        log.info("job finished", extra={"job_id": job.id, "status": status, "attempt": job.attempts,
                                        "runner": self.owner})
        if status in TERMINAL_STATUSES:
            self.processed += 1
            if job.callback_url:
                self._spawn(self._send_webhook(job.id))

    async def _send_webhook(self, job_id: str) -> None:
        job = await self._db(repo.get_job, job_id=job_id, user_id=None)
        if job is None or not job.callback_url:
            return
        delivered, attempts = await webhooks.deliver(job.callback_url, webhooks.job_payload(job))
        await self._db(repo.set_webhook_result, job_id=job_id, delivered=delivered, attempts=attempts)
        log.info("webhook delivered" if delivered else "webhook gave up",
                 extra={"job_id": job_id, "attempts": attempts})


def publish_queue_gauges(stats: dict[str, Any]) -> None:
    """Jobs by status and queue age (`repo.queue_stats`) on this process's Prometheus registry;
    the ingress's /metrics refreshes them from the database at each scrape."""
    from db.models import JOB_STATUSES
    from serve import metrics

    for status in JOB_STATUSES:
        metrics.JOBS.labels(status=status).set(stats["by_status"].get(status, 0))
    metrics.JOB_QUEUE_DEPTH.set(stats["queue_depth"])
    metrics.JOB_OLDEST_QUEUED_AGE.set(stats["oldest_queued_age_s"])


# ---------------------------------------------------------------- standalone process


def local_pipeline() -> TranscriptionPipeline:
    """The engines loaded in this process from the settings, diarizer included when its model
    loads (else diarize jobs fail at once with `diarization_unavailable`)."""
    from speech.asr import WhisperEngine
    from speech.audio import AudioLimits
    from speech.diarization import load_diarizer

    s = get_settings()
    engine = WhisperEngine(s.WHISPER_MODEL_PATH, device=s.AI_DEVICE, cache_dir=s.MODEL_CACHE_DIR)
    engine.load()
    diarizer, reason = load_diarizer(s.DIARIZATION_MODEL_PATH, engine.device, s.HF_TOKEN)
    limits = AudioLimits(max_bytes=s.AUDIO_MAX_FILE_SIZE, max_duration_s=s.AUDIO_MAX_DURATION_S)
    return TranscriptionPipeline.local(engine, diarizer, diarization_reason=reason, limits=limits)


def main(argv: list[str] | None = None) -> None:
    """Standalone runner process: `python -m serve.job_runner`; stops on SIGTERM."""
    from config.logging_setup import configure_logging

    parser = argparse.ArgumentParser(prog="python -m serve.job_runner", description=main.__doc__)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--lease-s", type=float, default=None)
    parser.add_argument("--heartbeat-s", type=float, default=None)
    parser.add_argument("--poll-s", type=float, default=None)
    parser.add_argument("--exit-when-idle", action="store_true", help="stop once the queue is empty")
    args = parser.parse_args(argv)
    s = get_settings()
    configure_logging(s.LOG_LEVEL, s.LOG_FILE)
    run_standalone(local_pipeline(), args)


def run_standalone(pipeline: Transcribes, args: argparse.Namespace) -> None:
    """Claim loops on this process's event loop until SIGTERM/SIGINT (or an empty queue)."""

    async def current() -> Transcribes:
        return pipeline

    async def amain() -> None:
        runner = JobRunner(current, concurrency=args.concurrency, lease_s=args.lease_s,
                           heartbeat_s=args.heartbeat_s, poll_s=args.poll_s)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner._stop.set)
        log.info("runner started", extra={"runner": runner.owner})
        if args.exit_when_idle:
            while await runner.run_once() is not None:
                pass
        else:
            await runner.run_until_stopped()
        log.info("runner stopped", extra={"runner": runner.owner, "processed": runner.processed})

    asyncio.run(amain())


if __name__ == "__main__":
    main()
