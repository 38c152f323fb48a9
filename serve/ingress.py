"""The composition root: the FastAPI app built inside the Serve replica, around the model handles.

`create_app(services)` wires the routers (serve/openai_api.py, serve/jobs_api.py) to one
`serve.context.Services` (model calls on the handles + the ingress's limits), which every route
reaches through `get_services`; the app can be built without Ray for unit tests. Nothing imports
this module but the graph (serve/app.py): routers and the job runner sit below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve

from config.settings import get_settings
from db import repository as repo
from db.session import session_scope
from serve import jobs_api, metrics, openai_api
from serve.auth import current_user
from serve.context import IngressConfig, Services, get_services
from serve.errors import install_error_handlers
from serve.job_runner import publish_queue_gauges
from serve.middleware import MULTIPART_OVERHEAD_BYTES, BodyLimitMiddleware, HttpMetricsMiddleware
from serve.ratelimit import rate_limit

log = logging.getLogger("serve.ingress")


def v1_dependencies() -> list[Any]:
    """Dependencies of every /v1 route: the one place to change them.

    Rate limit first (floods of bad keys are limited too), then the API key (401 without one).
    """
    return [rate_limit, current_user]


# --------------------------------------------------------------------------- the app
def create_app(services: Services) -> FastAPI:
    """The whole HTTP surface around `services`."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await _migrate()
        yield

    app = FastAPI(title="Speech transcription service", version="1.0", lifespan=lifespan,
                  description="OpenAI-compatible speech-to-text with diarization, on Ray Serve.")
    app.state.services = services
    install_error_handlers(app)
    app.include_router(openai_api.router, dependencies=[Depends(d) for d in v1_dependencies()])
    app.include_router(jobs_api.router)
    app.include_router(jobs_api.admin_router)

    @app.get("/health", tags=["ops"], summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], summary="Readiness: models loaded, dependencies reachable",
             responses={503: {"description": "Not ready: each check's outcome, and Retry-After",
                              "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def ready(s: Services = Depends(get_services)) -> JSONResponse:
        ok, checks = await s.readiness()
        return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks},
                            status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": "5"})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics of this ingress replica",
             response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        await _publish_job_gauges()
        body, content_type = metrics.render_latest()
        return Response(body, media_type=content_type)

    app.add_middleware(BodyLimitMiddleware,
                       limit_bytes=services.config.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
                       stall_timeout_s=services.config.upload_stall_timeout_s,
                       min_rate_bps=services.config.upload_min_rate_bps)
    app.add_middleware(HttpMetricsMiddleware)
    return app


async def _migrate() -> None:
    """Migrate the database at replica start (idempotent, serialised): the routes need the
    schema, and under `serve run`/`serve deploy` nothing else may have migrated it. Jobs are
    not run here: that is the JobRunnerDeployment's (serve/job_runner_deployment.py)."""
    from db.migrate import upgrade_head

    await asyncio.to_thread(upgrade_head)


async def _publish_job_gauges() -> None:
    """Refresh the job gauges (speech_job_*) from the database for a scrape: they describe the
    shared queue, and the runners serve no /metrics of their own. When the database does not
    answer within 5 s the last values stay (the scrape itself never fails)."""
    def read() -> dict[str, Any]:
        with session_scope() as session:
            return repo.queue_stats(session=session)

    try:
        publish_queue_gauges(await asyncio.wait_for(asyncio.to_thread(read), timeout=5))
    except Exception as exc:  # noqa: BLE001 - metrics must render without the database
        log.debug("job gauges not refreshed", extra={"error": type(exc).__name__})


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=128,
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress()
class Ingress:
    """The Serve ingress deployment: holds the handles, builds the app in the replica."""

    def __init__(self, asr: Any, diarizer: Any | None = None,
                 config: dict[str, Any] | None = None, runner: Any | None = None) -> None:
        from config.logging_setup import configure_logging

        settings = get_settings()
        configure_logging(settings.LOG_LEVEL, settings.LOG_FILE)
        self._services = Services(asr, diarizer, IngressConfig.from_dict(config), runner)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._services)
