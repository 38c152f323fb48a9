"""The deployment graph, bound in one place: Ingress(ASR, Diarization, JobRunner(ASR, Diarization)).

The Ingress is the application's one HTTP entry. The job runner is a deployment of its own
(serve/job_runner_deployment.py) on the same model handles; its handle is passed to the Ingress
(which reports it in /ready), which is what makes it part of the application.

`serve run serve_config.yaml` imports `serve.app:app`; `build_app(args)` is the same graph with
arguments (what `serve build serve.app:build_app` and the tests use). Placement, replicas,
batching and backpressure are configuration (serve_config*.yaml), not code.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve.asr_deployment import ASRDeployment
from serve.diarization_deployment import DiarizationDeployment
from serve.ingress import Ingress
from serve.job_runner_deployment import JobRunnerDeployment


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Bind the graph.

    args (all optional): `whisper_model`, `diarization_model`, `device` (default: Settings),
    `diarization` (bool, default true: bind the diarization deployment), `jobs` (bool, default
    true: bind the JobRunnerDeployment; false leaves queued jobs to standalone runners),
    `ingress` (dict of `serve.ingress.IngressConfig` fields, e.g. `max_upload_bytes`,
    `storage_base_path`, which the job runner uses too).
    """
    return build_from_config({"args": args or {}})



DEPLOYMENT_OPTION_KEYS = ("num_replicas", "max_ongoing_requests", "max_queued_requests",
                          "ray_actor_options", "user_config", "autoscaling_config",
                          "health_check_period_s", "health_check_timeout_s",
                          "graceful_shutdown_timeout_s")


def build_from_config(app_config: dict[str, Any]) -> Application:
    """The graph with one application entry of a serve config file applied: its `args` and
    its `deployments` options (what `serve run/deploy` would apply), for `serve.run`."""
    overrides = {d["name"]: {k: v for k, v in d.items() if k in DEPLOYMENT_OPTION_KEYS}
                 for d in app_config.get("deployments", [])}
    args = dict(app_config.get("args") or {})
    device = args.get("device")
    asr = ASRDeployment.options(**overrides.get("ASRDeployment", {})).bind(
        args.get("whisper_model"), device)
    diarizer = None
    if args.get("diarization", True):
        diarizer = DiarizationDeployment.options(
            **overrides.get("DiarizationDeployment", {})).bind(args.get("diarization_model"), device)
    runner = None
    if args.get("jobs", True):
        storage = (args.get("ingress") or {}).get("storage_base_path")
        runner = JobRunnerDeployment.options(**overrides.get("JobRunnerDeployment", {})).bind(
            asr, diarizer, str(storage) if storage is not None else None)
    return Ingress.options(**overrides.get("Ingress", {})).bind(asr, diarizer, args.get("ingress"),
                                                                 runner)


app = build_app()
"""The CPU-profile graph with Settings defaults; `import_path: serve.app:app`."""
