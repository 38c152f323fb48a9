"""`python -m serve`: the service on a bare machine (local Ray, CPU profile, packaged model).

Settings come from the environment; the serve config's `runtime_env.env_vars` only fill in what
the environment leaves unset (see `replica_env`), and a refused value stops it at once with a
message naming the variable. Migrates the database (embedded SQLite by default) and on first
start prints a local API key once; starts a private local Ray cluster (never joins one found on
the machine), runs the graph of `serve_config.yaml` with its deployment options, prints where it
listens, and on Ctrl-C or SIGTERM shuts down Serve and Ray.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "serve_config.yaml",
                        help="serve config file whose first application is run")
    parser.add_argument("--host", default=None, help="bind address (default: from the config)")
    parser.add_argument("--port", type=int, default=None, help="port (default: from the config)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use")
    parser.add_argument("--ray-auth-mode", choices=("disabled", "token"), default="disabled",
                        help="RAY_AUTH_MODE for the local cluster (token: Ray generates a token "
                             "in ~/.ray/auth_token)")
    return parser.parse_args(argv)


def replica_env(config_env: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables every replica is given (the local cluster's runtime_env `env_vars`).

    The serve config's `runtime_env.env_vars` are defaults: a name the operator set in this
    process's environment keeps the operator's value. Ray applies runtime_env `env_vars` over what
    a worker inherits, so passing the config's values unchanged would overrule the shell (e.g.
    `AI_DEVICE=cuda python -m serve` ran every replica on CPU because the config says `cpu`).
    Names the config does not mention need nothing here: the local cluster is started by this
    process and its workers inherit its environment.
    """
    return {name: environ[name] if name in environ else str(value)
            for name, value in config_env.items()}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Ray reads its auth mode from the environment when it starts: set it explicitly, first.
    os.environ["RAY_AUTH_MODE"] = args.ray_auth_mode
    config: dict[str, Any] = yaml.safe_load(args.config.read_text())
    http = dict(config.get("http_options") or {})
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    app_config = config["applications"][0]
    env_vars = replica_env((app_config.get("runtime_env") or {}).get("env_vars") or {}, os.environ)
    # This process (migrations, the local key) runs on the same settings as its replicas.
    os.environ.update(env_vars)

    from config.settings import SettingsError, get_settings

    get_settings.cache_clear()
    try:
        settings = get_settings()
    except SettingsError as exc:  # refused before anything starts, without a traceback
        print(f"python -m serve: {exc}", file=sys.stderr, flush=True)
        return 2

    import ray
    from ray import serve

    from config.logging_setup import configure_logging
    from serve.app import build_from_config

    configure_logging(settings.LOG_LEVEL, settings.LOG_FILE)
    # Replicas must find the same storage and embedded database as this process.
    env_vars["STORAGE_BASE_PATH"] = str(Path(settings.STORAGE_BASE_PATH).resolve())
    key = _prepare_database()
    if key:
        print(f"created the local admin API key (shown once, keep it): {key}", flush=True)
    ray.init(address="local", num_cpus=args.num_cpus, runtime_env={"env_vars": env_vars})
    # Where operators (and the reliability tests) attach: `ray status --address ...`.
    print(f"ray cluster: {ray.get_runtime_context().gcs_address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port,
                                  "request_timeout_s": http.get("request_timeout_s")})
        serve.run(build_from_config(app_config), name=app_config.get("name", "speech"),
                  route_prefix=app_config.get("route_prefix", "/"))
        print(f"speech service listening on http://{host}:{port}  "
              f"(docs: http://{host}:{port}/docs; Ctrl-C to stop)", flush=True)
        stop.wait()
        print("stopping: shutting down Serve and Ray", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _prepare_database() -> str | None:
    """Migrate; on the embedded default, the local key on first start (None afterwards).

    Imported without a fallback: a build that lacks its module must fail here, closed,
    rather than start a service whose routes run without authentication.
    """
    from serve.job_records import prepare_database

    return prepare_database()


if __name__ == "__main__":
    sys.exit(main())
