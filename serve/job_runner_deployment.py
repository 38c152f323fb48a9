"""The job runner as a Serve deployment of its own: no HTTP route, bound in the graph beside the
Ingress (serve/app.py), on the same ASR and diarization handles.

Apart from the Ingress so that a runner that crashes, or is killed, or is restarted takes no
synchronous request with it, and so that HTTP replicas and job capacity scale separately: each
replica of this deployment runs `JOB_RUNNER_CONCURRENCY` claim loops (0: it runs none and only
answers `status`). Any number of replicas, and standalone runners (`python -m serve.job_runner`),
may share one database: claims are leased (serve/job_runner.py).

- Start (`__init__`, async, on the replica's event loop): migrate the database (idempotent,
  serialised), then start the loops as tasks of that loop.
- Health (`check_health`, called by Serve every `health_check_period_s`): raises when a loop has
  ended although the runner was not stopped, so Serve replaces the replica.
- Graceful stop (`__del__`, awaited by Serve on redeploy, downscale and shutdown, within
  `graceful_shutdown_timeout_s`): stop claiming, cancel the model calls, hand the running jobs
  back to the queue at once (attempt counted). A replica that dies without it (killed, OOM)
  leaves its jobs to lease expiry, like any runner.
- `status()`: what the Ingress's /ready reports under `checks.runner`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from ray import serve

from config.settings import get_settings
from serve.job_runner import JobRunner
from serve.model_calls import ModelCalls
from serve.storage import delete_audio
from speech.audio import AudioLimits

log = logging.getLogger("serve.job_runner")


@serve.deployment(
    name="JobRunnerDeployment",
    num_replicas=1,
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 0.1},
    health_check_period_s=10,
)
class JobRunnerDeployment:
    """Holds the model handles and runs `serve.job_runner.JobRunner` on the replica's loop."""

    async def __init__(self, asr: Any, diarizer: Any | None = None,
                       storage_base_path: str | None = None) -> None:
        from config.logging_setup import configure_logging

        settings = get_settings()
        configure_logging(settings.LOG_LEVEL, settings.LOG_FILE)
        self._concurrency = settings.JOB_RUNNER_CONCURRENCY
        self._runner: JobRunner | None = None
        if self._concurrency <= 0:
            log.info("job runner replica idle: JOB_RUNNER_CONCURRENCY is 0")
            return
        from db.migrate import upgrade_head

        await asyncio.to_thread(upgrade_head)
        base = Path(storage_base_path) if storage_base_path else settings.STORAGE_BASE_PATH
        limits = AudioLimits(max_bytes=settings.AUDIO_MAX_FILE_SIZE,
                             max_duration_s=settings.AUDIO_MAX_DURATION_S)
        models = ModelCalls(asr, diarizer, limits=limits)
        self._runner = JobRunner(models.pipeline, concurrency=self._concurrency,
                                 delete_audio=lambda sha: delete_audio(sha, base_path=base))
        self._runner.start()
        log.info("job runner started", extra={"runner": self._runner.owner,
                                              "concurrency": self._concurrency})

    async def check_health(self) -> None:
        """Serve's health check: a runner whose loop died is restarted with its replica."""
        failure = self._runner.failure() if self._runner is not None else None
        if failure is not None:
            log.error("job runner unhealthy", extra={"error": failure})
            raise RuntimeError(f"job runner loop died: {failure}")

    async def status(self) -> dict[str, Any]:
        """This replica's runner: owner (the lease owner it writes), loops, running job ids,
        jobs finished since it started."""
        runner = self._runner
        return {"owner": runner.owner if runner else None, "concurrency": self._concurrency,
                "running": runner.running if runner else [],
                "processed": runner.processed if runner else 0,
                "healthy": runner is None or runner.failure() is None}

    async def __del__(self) -> None:
        """Graceful stop (Serve awaits it): no new claims, running jobs handed back at once."""
        runner, self._runner = getattr(self, "_runner", None), None
        if runner is None:
            return
        running = runner.running
        await runner.stop(release=True)
        log.info("job runner stopped", extra={"runner": runner.owner, "released": running,
                                              "processed": runner.processed})
