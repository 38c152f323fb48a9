"""Does the service keep the model busy? Service under load against the engine's own ceiling.

In one run, on the same clips and the same CPU budget (the ASR replica's torch threads and batch
size, from serve_config.yaml):
- the engine alone given all clips in one call (its batched throughput: the ceiling),
- the engine alone one clip at a time,
- the service at 1/4/16/64 concurrent clients (bench/loadgen.py), with the mean batch the ASR
  replica formed at each level (from its own batch record),
- the p50 latency of the 11 s JFK clip at one client.
Each is repeated (--repeats, default 3) and the median reported, with the load average. Ends with

    RESULT service16_over_engine_batched=<f> mean_batch16=<f> speedup16_vs_1client=<f> p50_1client_s=<f> errors_non503=<n>

Without --url it starts the service itself (private local Ray, RAY_AUTH_MODE=disabled, the CPU
profile of serve_config.yaml on a free port, a throwaway storage/SQLite database with its own
API key, rate limits off so the load is not refused by them) and stops it at the end; only
then is the batch record readable.

    .venv/bin/python bench/serve_load.py [--url http://127.0.0.1:8000 --api-key sk-...] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.data import LONG, require  # noqa: E402
from bench.loadgen import JFK, SHORT_CLIPS, Level, durations  # noqa: E402
from bench.loadgen import drive as _drive  # noqa: E402

HEADERS: dict[str, str] = {}
APP_NAME = "speech"


def drive(url: str, clients: int, seconds: float, clips: list[Path], dur: dict[Path, float]) -> Level:
    """`clients` concurrent clients (bench/loadgen.py), each sending clips back to back."""
    return _drive(url, clients, seconds, clips, dur, headers=dict(HEADERS))


def _replica_budget() -> tuple[int, int]:
    """(torch threads, max batch size) of the ASR replica in serve_config.yaml: the most threads
    its batches may use (`threads_when_alone` when the machine is otherwise idle, else one per
    CPU asked for), so the engine alone is measured with no fewer threads than the replica had."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    asr = next(d for d in config["applications"][0]["deployments"] if d["name"] == "ASRDeployment")
    user_config = asr.get("user_config") or {}
    threads = max(1, int(asr["ray_actor_options"]["num_cpus"]))  # Ray sets OMP threads so
    threads = max(threads, int(user_config.get("threads_when_alone") or 0))
    return threads, int(user_config.get("max_batch_size", 8))


def _engine():  # noqa: ANN202 - a loaded WhisperEngine on the replica's budget
    import torch

    from config.settings import get_settings
    from speech.asr import WhisperEngine

    threads, batch = _replica_budget()
    torch.set_num_threads(threads)
    settings = get_settings()
    engine = WhisperEngine(settings.WHISPER_MODEL_PATH, "cpu", settings.MODEL_CACHE_DIR,
                           max_batch_size=batch)
    engine.load()
    return engine


def engine_alone(engine, seconds: float, clips: list[Path], dur: dict[Path, float], *,  # noqa: ANN001
                 batched: bool) -> Level:
    """The same clips through the engine in this process, no HTTP, no Ray: one clip a call, or
    every clip in one call (their windows batched, as the replica would at best)."""
    from speech.audio import decode_audio
    from speech.types import TranscribeOptions

    audio = {p: decode_audio(p) for p in clips}
    engine.transcribe([audio[clips[0]]], TranscribeOptions())  # warm-up
    level = Level(len(clips) if batched else 1)
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        group = clips if batched else [clips[i % len(clips)]]
        i += 1
        t0 = time.monotonic()
        engine.transcribe([audio[p] for p in group], TranscribeOptions())
        for p in group:
            level.latencies.append(time.monotonic() - t0)
            level.audio_s += dur[p]
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
           "RATE_LIMIT_KEY_PER_MINUTE": "0", "JOB_RUNNER_CONCURRENCY": "1"}  # idle but for --long-job
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
        serve.run(build_from_config(app_config), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def _rate(level: Level) -> float:
    return level.audio_s / level.elapsed if level.elapsed else float("nan")


def _batch_record() -> list[dict] | None:
    """The ASR replica's recent batches, when this process runs the service."""
    try:
        from ray import serve

        handle = serve.get_deployment_handle("ASRDeployment", APP_NAME)
        return handle.batch_stats.remote().result()["batches"]
    except Exception:  # noqa: BLE001 - a service elsewhere (--url): no record
        return None


def _new_batches(before: list[dict] | None, after: list[dict] | None) -> list[dict]:
    if before is None or after is None:
        return []
    return after[len(before):] if len(after) > len(before) else after[-1:]


def _mean_batch(before: list[dict] | None, after: list[dict] | None) -> float:
    new = _new_batches(before, after)
    return statistics.fmean(b["batch_size"] for b in new) if new else float("nan")


STAGE_METRIC = "speech_request_stage_seconds"
HTTP_METRIC = "speech_http_request_duration_seconds"
ROUTE = "/v1/audio/transcriptions"


def _stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """stage -> (seconds, count) so far, from the ingress's /metrics; "request" is the whole
    HTTP request (the route's duration histogram)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=HEADERS, timeout=30).text
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (STAGE_METRIC, HTTP_METRIC):
            continue
        for sample in family.samples:
            if family.name == STAGE_METRIC:
                key = sample.labels.get("stage", "?")
            elif sample.labels.get("route") == ROUTE and sample.labels.get("method") == "POST":
                key = "request"
            else:
                continue
            if sample.name.endswith("_sum"):
                totals.setdefault(key, [0.0, 0.0])[0] += sample.value
            elif sample.name.endswith("_count"):
                totals.setdefault(key, [0.0, 0.0])[1] += sample.value
    return {k: (v[0], v[1]) for k, v in totals.items()}


def where_time_goes(url: str, before: dict[str, tuple[float, float]], batches: list[dict],
                    wall_s: float) -> str:
    """One line: mean seconds per request in each stage during a level (ingress metrics), and
    the replica's side: windows' mean wait for a batch, compute per batch, model busy share."""
    after = _stage_totals(url)
    parts = []
    order = ["request", "store", "decode", "plan", "asr", "assemble", "record"]
    for stage in order:
        s1, n1 = after.get(stage, (0.0, 0.0))
        s0, n0 = before.get(stage, (0.0, 0.0))
        if n1 > n0:
            parts.append(f"{stage} {1000 * (s1 - s0) / (n1 - n0):.0f}")
    if batches:
        busy = sum(b["compute_s"] for b in batches) / wall_s if wall_s else float("nan")
        queued = statistics.fmean(b.get("queued_s", float("nan")) for b in batches)
        compute = statistics.fmean(b["compute_s"] for b in batches)
        lent = sum(b.get("threads", 1) > 1 for b in batches)
        parts.append(f"| replica: queued {1000 * queued:.0f}, compute/batch {1000 * compute:.0f}, "
                     f"model busy {busy:.0%}, {lent}/{len(batches)} batches with threads_when_alone")
        sizes = " ".join(str(b["batch_size"]) for b in batches)
        return "    ms per request: " + ", ".join(parts) + f"\n    batches in order: {sizes}"
    return "    ms per request: " + ", ".join(parts)


def run(url: str, seconds: float, levels: list[int], repeats: int, dur: dict[Path, float],
        engine) -> None:  # noqa: ANN001
    print(f"clips: {len(SHORT_CLIPS)} real recordings of {min(dur.values()):.1f}-"
          f"{max(dur.values()):.1f} s; {seconds:g} s per level, {repeats} repeats; "
          f"replica budget: {_replica_budget()[0]} torch thread(s), batch {_replica_budget()[1]}",
          flush=True)
    drive(url, 2, 5, SHORT_CLIPS, dur)  # warm-up, not counted
    rates: dict[str, list[float]] = {}
    batches: dict[int, list[float]] = {n: [] for n in levels}
    p50s: list[float] = []
    errors = 0
    for r in range(repeats):
        # The engine runs with the service idle (its replicas wait), so both see the same cores.
        batched = engine_alone(engine, seconds, SHORT_CLIPS, dur, batched=True)
        single = engine_alone(engine, seconds, SHORT_CLIPS, dur, batched=False)
        rates.setdefault("engine batched", []).append(_rate(batched))
        rates.setdefault("engine 1 by 1", []).append(_rate(single))
        print(batched.line(f"[{r + 1}] engine all"), flush=True)
        print(single.line(f"[{r + 1}] engine 1x1"), flush=True)
        for n in levels:
            before, stages = _batch_record(), _stage_totals(url)
            level = drive(url, n, seconds, SHORT_CLIPS, dur)
            after = _batch_record()
            batches[n].append(_mean_batch(before, after))
            rates.setdefault(f"{n} clients", []).append(_rate(level))
            errors += sum(v for k, v in level.statuses.items() if k not in (200, 503))
            print(level.line(f"[{r + 1}] {n} clients") + f"  mean batch {batches[n][-1]:.1f}", flush=True)
            print(where_time_goes(url, stages, _new_batches(before, after), level.elapsed), flush=True)
        jfk = drive(url, 1, max(10.0, seconds / 2), [JFK], dur)
        errors += sum(v for k, v in jfk.statuses.items() if k not in (200, 503))
        p50s.append(jfk.pct(0.5))
        print(jfk.line(f"[{r + 1}] JFK x1"), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print("\nmedians (audio-seconds per second):", flush=True)
    for name, value in med.items():
        n = int(name.split()[0]) if name.endswith("clients") else None
        extra = f"   mean batch {statistics.median(batches[n]):.1f}" if n else ""
        print(f"  {name:>16} {value:8.2f}{extra}", flush=True)
    print(f"  load average {os.getloadavg()}", flush=True)
    ref = 16 if 16 in levels else max(levels)
    one = 1 if 1 in levels else min(levels)
    print(f"RESULT service16_over_engine_batched={med[f'{ref} clients'] / med['engine batched']:.2f} "
          f"mean_batch16={statistics.median(batches[ref]):.1f} "
          f"speedup16_vs_1client={med[f'{ref} clients'] / med[f'{one} clients']:.2f} "
          f"p50_1client_s={statistics.median(p50s):.2f} errors_non503={errors}", flush=True)


def long_job(url: str, path: Path) -> None:
    """One long recording as a job: its progress timeline as the event stream shows it (one
    step per decoded window), and its speed."""
    import httpx

    from speech.audio import audio_duration_s, decode_audio

    seconds = audio_duration_s(decode_audio(path))
    with path.open("rb") as fh:
        job = httpx.post(url + "/v1/jobs", headers=HEADERS, files={"file": (path.name, fh)},
                         data={"language": "en"}, timeout=600).json()
    t0 = time.monotonic()
    timeline: list[tuple[float, str, float]] = []
    last_id = None
    while not timeline or timeline[-1][1] not in ("succeeded", "failed", "cancelled"):
        headers = {**HEADERS, **({"Last-Event-ID": last_id} if last_id else {})}
        with httpx.stream("GET", f"{url}/v1/jobs/{job['id']}/events", headers=headers,
                          timeout=None) as stream:
            event: dict[str, str] = {}
            for line in stream.iter_lines():
                if line:
                    key, _, value = line.partition(": ")
                    event[key] = value
                    continue
                if "data" in event:
                    state = json.loads(event["data"])
                    last_id = event.get("id", last_id)
                    timeline.append((time.monotonic() - t0, state["status"], state["progress"]))
                event = {}
    wall = timeline[-1][0]
    print(f"\nlong job: {path.name}, {seconds / 60:.1f} min: {timeline[-1][1]} in {wall:.0f} s "
          f"= {seconds / wall:.1f}x real time; {len(timeline)} events", flush=True)
    shown = timeline if len(timeline) <= 24 else timeline[:: max(1, len(timeline) // 20)] + timeline[-1:]
    print("  t (s)   status      progress", flush=True)
    for t, status, progress in shown:
        print(f"  {t:6.1f}  {status:<10} {progress:8.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service; default: start one locally")
    parser.add_argument("--api-key", help="API key for --url")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per concurrency level")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-job", type=Path, default=None, const=LONG, nargs="?",
                        help="also run this recording as a job and print its progress timeline "
                             "(default with the flag: the 54-minute LibriSpeech file)")
    args = parser.parse_args()
    require(*SHORT_CLIPS)
    levels = [int(x) for x in args.clients.split(",")]
    dur = durations()
    engine = _engine()
    if args.url:
        if args.api_key:
            HEADERS["Authorization"] = f"Bearer {args.api_key}"
        run(args.url.rstrip("/"), args.seconds, levels, args.repeats, dur, engine)
        if args.long_job:
            long_job(args.url.rstrip("/"), args.long_job)
    else:
        with local_service() as url:
            run(url, args.seconds, levels, args.repeats, dur, engine)
            if args.long_job:
                long_job(url, args.long_job)


if __name__ == "__main__":
    main()
