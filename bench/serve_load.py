"""Load on the HTTP service: N concurrent clients sending short real clips for a fixed time.

Prints, per concurrency level, requests/s, audio-seconds/s, p50/p95/p99 latency and errors,
next to the engine alone transcribing the same clips one at a time in this process; then the
p50 latency of the 11 s JFK clip at one client. Ends with one line:

    RESULT clients=16 speedup_vs_sequential=<f> p50_s_1client=<f> errors_non503=<n>

Without --url it starts the service itself (private local Ray, RAY_AUTH_MODE=disabled, the CPU
profile of serve_config.yaml on a free port, a throwaway storage/SQLite database with its own
API key, rate limits off so the load is not refused by them) and stops it at the end.

    .venv/bin/python bench/serve_load.py [--url http://127.0.0.1:8000 --api-key sk-...] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.data import require  # noqa: E402
from bench.loadgen import JFK, SHORT_CLIPS, Level, durations  # noqa: E402
from bench.loadgen import drive as _drive  # noqa: E402

HEADERS: dict[str, str] = {}


def drive(url: str, clients: int, seconds: float, clips: list[Path], dur: dict[Path, float]) -> Level:
    """`clients` concurrent clients (bench/loadgen.py), each sending clips back to back."""
    return _drive(url, clients, seconds, clips, dur, headers=dict(HEADERS))


def engine_alone(seconds: float, clips: list[Path], dur: dict[Path, float]) -> Level:
    """The same clips through the engine in this process, one at a time, no HTTP, no Ray."""
    from config.settings import get_settings
    from speech.asr import WhisperEngine
    from speech.audio import decode_audio
    from speech.types import TranscribeOptions

    import torch

    settings = get_settings()
    # The same torch thread count as the ASR replica (Ray sets OMP_NUM_THREADS = its num_cpus).
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    asr = next(d for d in config["applications"][0]["deployments"] if d["name"] == "ASRDeployment")
    torch.set_num_threads(max(1, int(asr["ray_actor_options"]["num_cpus"])))
    engine = WhisperEngine(settings.WHISPER_MODEL_PATH, "cpu", settings.MODEL_CACHE_DIR)
    engine.load()
    audio = {p: decode_audio(p) for p in clips}
    engine.transcribe([audio[clips[0]]], TranscribeOptions())  # warm-up
    level = Level(1)
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        path = clips[i % len(clips)]
        i += 1
        t0 = time.monotonic()
        engine.transcribe([audio[path]], TranscribeOptions())
        level.latencies.append(time.monotonic() - t0)
        level.audio_s += dur[path]
        level.statuses[200] += 1
    level.seconds = time.monotonic() - start
    return level


@contextmanager
def local_service() -> Iterator[str]:
    os.environ["RAY_AUTH_MODE"] = "disabled"  # explicit, before Ray starts
    import ray
    from ray import serve

    from serve.app import build_from_config

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    env = {"STORAGE_BASE_PATH": str(tmp), "RATE_LIMIT_PER_MINUTE": "0",
           "RATE_LIMIT_KEY_PER_MINUTE": "0", "JOB_RUNNER_CONCURRENCY": "0"}
    os.environ.update(env)  # this process's settings too: the key goes into the same database
    from config.settings import get_settings
    from serve.job_records import prepare_database

    get_settings.cache_clear()
    HEADERS["Authorization"] = f"Bearer {prepare_database()}"
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_config = config["applications"][0]
        serve.run(build_from_config(app_config), name=app_config["name"], route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def run(url: str, seconds: float, levels: list[int], alone: Level, dur: dict[Path, float]) -> None:
    print(f"clips: {len(SHORT_CLIPS)} real recordings of {min(dur.values()):.1f}-"
          f"{max(dur.values()):.1f} s; {seconds:g} s per level", flush=True)
    drive(url, 2, 5, SHORT_CLIPS, dur)  # warm-up, not counted
    results = {}
    for n in levels:
        results[n] = drive(url, n, seconds, SHORT_CLIPS, dur)
        print(results[n].line(f"{n} clients"), flush=True)
    jfk = drive(url, 1, max(10.0, seconds / 2), [JFK], dur)
    print(jfk.line("JFK 11 s x1"), flush=True)
    print(alone.line("engine alone"), flush=True)
    ref = 16 if 16 in results else max(results)
    speedup = (results[ref].audio_s / results[ref].elapsed) / (alone.audio_s / alone.elapsed)
    errors = sum(v for lv in [*results.values(), jfk] for k, v in lv.statuses.items()
                 if k not in (200, 503))
    print(f"RESULT clients={ref} speedup_vs_sequential={speedup:.2f} "
          f"p50_s_1client={jfk.pct(0.5):.2f} errors_non503={errors}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service; default: start one locally")
    parser.add_argument("--api-key", help="API key for --url")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per concurrency level")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrency levels")
    args = parser.parse_args()
    require(*SHORT_CLIPS)
    levels = [int(x) for x in args.clients.split(",")]
    dur = durations()
    # The baseline first, before any service runs on this machine's cores.
    alone = engine_alone(args.seconds, SHORT_CLIPS, dur)
    print(alone.line("engine alone"), flush=True)
    if args.url:
        if args.api_key:
            HEADERS["Authorization"] = f"Bearer {args.api_key}"
        run(args.url.rstrip("/"), args.seconds, levels, alone, dur)
    else:
        with local_service() as url:
            run(url, args.seconds, levels, alone, dur)


if __name__ == "__main__":
    main()
