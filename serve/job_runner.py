"""The job runner: claims queued jobs under a lease, transcribes them, stores results once.

Transcription is an injected async callable `transcribe(audio_path, options) -> Transcript`, so the
same runner drives the ASR deployment inside Serve (through handles) and the engine directly in a
standalone process (`python -m serve.job_runner`). Database calls run in threads, never on the loop.

Guarantees (see db/repository.py): a job whose runner dies is claimed again when its lease expires,
at most JOB_MAX_ATTEMPTS times; only the current lease owner may write results, and writing replaces
what an earlier attempt wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from config.settings import get_settings
from db import repository as repo
from db.models import TERMINAL_STATUSES, Job, utcnow
from db.session import get_sessionmaker
from serve import webhooks
from speech.errors import SpeechError
from speech.types import Segment, Transcript, TranscribeOptions

log = logging.getLogger(__name__)


class JobOptions(BaseModel):
    """What a job asks for: the transcription endpoint's options plus diarization hints."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model: str | None = None
    language: str | None = Field(default=None, max_length=16)
    prompt: str | None = Field(default=None, max_length=4000)
    task: Literal["transcribe", "translate"] = "transcribe"
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    word_timestamps: bool = False
    diarize: bool = False
    num_speakers: int | None = Field(default=None, ge=1, le=64)
    min_speakers: int | None = Field(default=None, ge=1, le=64)
    max_speakers: int | None = Field(default=None, ge=1, le=64)

    @model_validator(mode="after")
    def _speaker_range(self) -> JobOptions:
        if self.min_speakers and self.max_speakers and self.min_speakers > self.max_speakers:
            raise ValueError("min_speakers must not exceed max_speakers")
        return self

    def transcribe_options(self) -> TranscribeOptions:
        return TranscribeOptions(language=self.language, task=self.task, initial_prompt=self.prompt,
                                 word_timestamps=self.word_timestamps, temperature=self.temperature)


class Transcribe(Protocol):
    def __call__(self, audio: Path, options: JobOptions) -> Awaitable[Transcript]: ...


_progress: contextvars.ContextVar[Callable[[float], None] | None] = contextvars.ContextVar("job_progress", default=None)


def report_progress(fraction: float) -> None:
    """Called by a transcribe callable to publish progress (0..1); written at the next heartbeat."""
    callback = _progress.get()
    if callback is not None:
        callback(min(max(fraction, 0.0), 1.0))


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
        transcribe: Transcribe,
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
        self.transcribe = transcribe
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
        from serve.errors import is_database_unavailable

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
                from serve.errors import is_database_unavailable

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
        remover = self._delete_audio
        if remover is None:
            try:
                from serve.storage import delete_audio as remover  # type: ignore[no-redef]
            except ImportError:  # storage module not present in this deployment
                return
        remover(sha256)

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
        progress: list[float] = [0.0]
        _progress.set(lambda fraction: progress.__setitem__(0, fraction))  # seen by the work task below
        try:
            options = JobOptions.model_validate(job.options)
        except ValueError as exc:
            await self._finish(job, await self._db_retrying(repo.release_job, job_id=job.id, owner=self.owner,
                                                             error=f"invalid_option: {exc}", retry=False))
            return
        work = asyncio.ensure_future(self.transcribe(Path(job.audio_path or ""), options))
        self._held.add(job.id)
        try:
            if not await self._heartbeat(job, work, progress):
                return
        finally:
            self._held.discard(job.id)
            if not work.done():  # stopped, cancelled or lease lost: no orphaned model call
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        from serve.errors import OverloadedError

        try:
            transcript = work.result()
        except OverloadedError:  # backpressure: not the job's fault, so the attempt is not counted
            status = await self._db_retrying(repo.release_job, job_id=job.id, owner=self.owner,
                                             error="model overloaded; requeued", retry=True, refund_attempt=True)
            await asyncio.sleep(self.poll_s)
        except SpeechError as exc:  # bad input: retrying cannot help
            status = await self._db_retrying(repo.release_job, job_id=job.id, owner=self.owner,
                                             error=f"{exc.code}: {exc}", retry=False)
        except FileNotFoundError:  # audio deleted (job deleted, retention): nothing to retry
            status = await self._db_retrying(repo.release_job, job_id=job.id, owner=self.owner,
                                             error="audio_missing: the job's audio is no longer stored", retry=False)
        except Exception as exc:  # noqa: BLE001 - anything else may be transient: retry
            log.warning("job attempt failed", extra={"job_id": job.id, "error": type(exc).__name__})
            status = await self._db_retrying(repo.release_job, job_id=job.id, owner=self.owner,
                                             error=f"{type(exc).__name__}: {exc}"[:2000], retry=True)
        else:
            ok = await self._db_retrying(repo.complete_job, job_id=job.id, owner=self.owner, transcript=transcript)
            status = "succeeded" if ok else None
        await self._finish(job, status)

    async def _heartbeat(self, job: Job, work: asyncio.Future[Any], progress: list[float]) -> bool:
        """Renew the lease every heartbeat until `work` is done; False when the lease was lost or
        the job cancelled. A heartbeat the database cannot take (it is restarting) is skipped,
        not fatal: the work goes on, and the lease is renewed at the next one that lands."""
        from serve.errors import is_database_unavailable

        while True:
            done, _ = await asyncio.wait({work}, timeout=self.heartbeat_s)
            if done:
                return True
            try:
                renewed = await self._db(repo.renew_lease, job_id=job.id, owner=self.owner,
                                         lease_s=self.lease_s, progress=progress[0])
            except Exception as exc:
                if not is_database_unavailable(exc):
                    raise
                log.warning("heartbeat failed: database unavailable", extra={
                    "job_id": job.id, "runner": self.owner, "error": type(exc).__name__})
                continue
            if not renewed:
                log.info("job cancelled or lease lost; result discarded", extra={"job_id": job.id})
                return False

    async def _finish(self, job: Job, status: str | None) -> None:
        if status is None:
            log.info("job no longer ours; result discarded", extra={"job_id": job.id})
            return
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


# ---------------------------------------------------------------- transcribe callables


def noop_transcriber(delay_s: float = 0.0) -> Transcribe:
    """A stand-in model for queue tests and benchmarks: one empty segment after `delay_s`.

    It tests the queue, never transcription: nothing reads the audio.
    """

    async def transcribe(audio: Path, options: JobOptions) -> Transcript:
        if delay_s:
            await asyncio.sleep(delay_s)
        return Transcript(language=options.language or "en", duration=0.0,
                          segments=[Segment(id=0, start=0.0, end=0.0, text="")])

    return transcribe


def engine_transcriber(engine: Any, diarizer: Any | None = None) -> Transcribe:
    """The engine run directly (standalone runner, tests): decode, transcribe, diarize, in a thread."""
    lock = asyncio.Lock()  # one model call at a time in this process; batching is Serve's job

    def run(audio_path: Path, options: JobOptions) -> Transcript:
        from speech.audio import decode_audio

        audio = decode_audio(audio_path, max_duration_s=get_settings().AUDIO_MAX_DURATION_S)
        report_progress(0.1)
        transcript = engine.transcribe([audio], options.transcribe_options())[0]
        if options.diarize and diarizer is not None:
            from speech.speaker_merge import assign_speakers

            turns = diarizer.diarize(audio, num_speakers=options.num_speakers,
                                     min_speakers=options.min_speakers, max_speakers=options.max_speakers)
            transcript = assign_speakers(transcript, turns)
        return transcript

    async def transcribe(audio: Path, options: JobOptions) -> Transcript:
        async with lock:
            return await asyncio.to_thread(contextvars.copy_context().run, run, audio, options)

    return transcribe


def handles_transcriber(asr: Any, diarizer: Any | None = None) -> Transcribe:
    """Inside Serve: decode here, then the ASR (+ diarization) deployments through their handles,
    so job windows share batches with the synchronous requests."""
    from serve.ingress import run_transcription

    async def transcribe(audio_path: Path, options: JobOptions) -> Transcript:
        from speech.audio import decode_audio

        audio = await asyncio.to_thread(decode_audio, audio_path,
                                        max_duration_s=get_settings().AUDIO_MAX_DURATION_S)
        report_progress(0.1)
        return await run_transcription(
            asr, diarizer, audio, options.transcribe_options(), diarize=options.diarize,
            num_speakers=options.num_speakers, min_speakers=options.min_speakers,
            max_speakers=options.max_speakers)

    return transcribe


def _load_engine() -> Any:
    from speech.asr import WhisperEngine

    s = get_settings()
    engine = WhisperEngine(model=s.WHISPER_MODEL_PATH, device="cpu" if s.AI_DEVICE == "cpu" else s.AI_DEVICE,
                           cache_dir=s.MODEL_CACHE_DIR)
    engine.load()
    return engine


def main(argv: list[str] | None = None) -> None:
    """Standalone runner process: `python -m serve.job_runner [--engine whisper|noop]`; stops on SIGTERM."""
    from config.logging_setup import configure_logging

    parser = argparse.ArgumentParser(prog="python -m serve.job_runner", description=main.__doc__)
    parser.add_argument("--engine", choices=("whisper", "noop"), default="whisper")
    parser.add_argument("--noop-delay-s", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--lease-s", type=float, default=None)
    parser.add_argument("--heartbeat-s", type=float, default=None)
    parser.add_argument("--poll-s", type=float, default=None)
    parser.add_argument("--exit-when-idle", action="store_true", help="stop once the queue is empty")
    args = parser.parse_args(argv)
    s = get_settings()
    configure_logging(s.LOG_LEVEL, s.LOG_FILE)
    transcribe = noop_transcriber(args.noop_delay_s) if args.engine == "noop" else engine_transcriber(_load_engine())

    async def amain() -> None:
        runner = JobRunner(transcribe, concurrency=args.concurrency, lease_s=args.lease_s,
                           heartbeat_s=args.heartbeat_s, poll_s=args.poll_s)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner._stop.set)
        log.info("runner started", extra={"runner": runner.owner, "engine": args.engine})
        if args.exit_when_idle:
            while await runner.run_once() is not None:
                pass
        else:
            await runner.run_until_stopped()
        log.info("runner stopped", extra={"runner": runner.owner, "processed": runner.processed})

    asyncio.run(amain())


if __name__ == "__main__":
    main()
