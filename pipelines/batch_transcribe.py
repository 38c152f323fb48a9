"""Bulk transcription of thousands of files with Ray Data, resumable, one JSON line per file.

    ray job submit --working-dir . -- python -m pipelines.batch_transcribe \
        --input /data/in --output /data/out/results.jsonl [--format srt vtt] [--db --user EMAIL]
    python -m pipelines.batch_transcribe --input 'calls/**/*.wav' --output out.jsonl   # local Ray

Stages (pipelines.stages): read + sha256 + decode + VAD-cut on CPU tasks -> [diarization actor
pool] -> Whisper actor pool, batches of windows from many files -> stitched per file in the driver
(pipelines.assemble) -> JSONL (+ srt/vtt per file) and/or the service database (pipelines.db_sink).

Resuming: a file whose content (sha256) an earlier run with the same model, options and
diarization already finished is not decoded again; failed files are not retried unless
`--retry-failed`. Exit status: 0 when every file succeeded (or was done before), 1 when any file
failed this run (each recorded with its error; the rest of the batch still ran), 2 for a usage
or configuration error (no input, unknown user, bad option) before any file was processed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.inputs import InputError, is_remote, list_inputs
from pipelines.records import FileRecord, JsonlWriter, read_records, resolve_output, write_formats
from speech.audio import AudioLimits
from speech.errors import InvalidOptionError, ModelNotFoundError, SpeechError
from speech.request import SpeakerHints, TranscriptionRequest, check_request
from speech.types import TranscribeOptions

log = logging.getLogger("pipelines.batch_transcribe")

DECODE_CPUS = 0.5
SUBTITLE_FORMATS = ("srt", "vtt", "txt", "text", "tsv", "json", "verbose_json", "rttm")


class UsageError(Exception):
    """A problem with the command line or configuration (exit status 2)."""


@dataclass
class RunConfig:
    """Everything one run needs; the CLI builds it, tests and bench/pipeline.py build it directly."""

    inputs: list[str]
    output: str | None = None
    formats: list[str] = field(default_factory=list)
    db: bool = False
    user: str | None = None
    db_url: str | None = None
    model: str | None = None
    language: str | None = None
    task: str = "transcribe"
    prompt: str | None = None
    word_timestamps: bool = False
    diarize: bool = False
    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None
    num_gpus_per_actor: float | None = None
    actors: int | None = None
    batch_windows: int | None = None
    threads_per_actor: int | None = None
    retry_failed: bool = False
    ray_address: str | None = None
    ray_auth_mode: str = "disabled"
    num_cpus: int | None = None
    progress_every_s: float = 10.0

    def request(self) -> TranscriptionRequest:
        """The run's one request, the same type every entry point builds."""
        options = TranscribeOptions(language=self.language, task=self.task,  # type: ignore[arg-type]
                                    initial_prompt=self.prompt, word_timestamps=self.word_timestamps)
        return TranscriptionRequest(options=options, diarize=self.diarize,
                                    speakers=SpeakerHints(self.num_speakers, self.min_speakers,
                                                          self.max_speakers))


@dataclass
class Summary:
    files: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0
    windows: int = 0
    """30 s model windows transcribed (the model's unit of work: files shorter than 30 s pay a whole one)."""
    model_s: float = 0.0
    """Actor-seconds inside the Whisper engine; with `wall_s` and the actor count, how busy the model was."""
    decode_s: float = 0.0
    """Task-seconds reading, hashing, decoding and cutting files (CPU stage)."""
    actors: int = 0
    threads: int | None = None
    """Torch threads per CPU actor (None on GPU)."""
    failures: list[FileRecord] = field(default_factory=list)

    @property
    def rtfx(self) -> float:
        """Seconds of audio transcribed per second of wall time (higher is faster)."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def table(self) -> str:
        rtf = (self.wall_s / self.audio_s) if self.audio_s > 0 else float("nan")
        rows = [
            ("files", f"{self.files}"),
            ("  succeeded", f"{self.succeeded}"),
            ("  skipped (done before)", f"{self.skipped}"),
            ("  failed", f"{self.failed}"),
            ("audio transcribed", f"{self.audio_s / 3600:.3f} h ({self.audio_s:.1f} s)"),
            ("wall time", f"{self.wall_s:.1f} s"),
            ("speed", f"{self.rtfx:.1f}x real time (RTF {rtf:.4f})"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["", "batch summary", "-" * (width + 30)] + [f"{k:<{width}}  {v}" for k, v in rows]
        for rec in self.failures[:20]:
            lines.append(f"FAILED {rec.path}: [{rec.error_code}] {rec.error}")
        if len(self.failures) > 20:
            lines.append(f"... and {len(self.failures) - 20} more failures (see the output)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ Ray
GCS_PROBE_TIMEOUT_S = 3.0


def _cluster_address(cfg: RunConfig) -> tuple[str | None, str]:
    """The cluster to join and where its address came from; (None, ...) means a private one.

    `--ray-address`, else `RAY_ADDRESS` (what `ray job submit` sets for its entrypoint), else the
    address the last `ray start --head` on this machine recorded (`<ray temp dir>/ray_current_cluster`,
    left behind when that head is gone). Ray's "auto" also joins any GCS process it finds with `ps`
    (other programs' private clusters); a bulk run does not.
    """
    if cfg.ray_address == "local":
        return None, "--ray-address local"
    if cfg.ray_address and cfg.ray_address != "auto":
        return cfg.ray_address, "--ray-address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env not in ("auto", "local"):
        return env, "RAY_ADDRESS"
    if env == "local":
        return None, "RAY_ADDRESS=local"
    from ray._common.utils import get_ray_address_file

    recorded = get_ray_address_file(None)
    try:
        address = Path(recorded).read_text().strip()
    except OSError:
        address = ""
    return (address or None), recorded


def _gcs_answers(address: str, timeout_s: float = GCS_PROBE_TIMEOUT_S) -> bool:
    """Whether anything accepts a connection at the address's GCS (or Ray Client) port, within
    `timeout_s`. `ray.init` itself retries a dead GCS for as long as Ray's reconnect settings allow
    (a bulk run without a cluster would sit there); a refused or silent port is a dead cluster."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _connect(cfg: RunConfig, *, out=sys.stdout) -> bool:  # noqa: ANN001 - a text stream
    """Use the Ray this process already has, else the cluster at --ray-address (or RAY_ADDRESS /
    the one `ray start` recorded on this machine), else start a private local one. Returns whether
    we must shut it down.

    A cluster named explicitly (--ray-address, RAY_ADDRESS) that does not answer within
    GCS_PROBE_TIMEOUT_S is a usage error naming the address; a recorded address that does not
    answer (a stopped head leaves it behind) is reported and a private cluster started instead.
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    address, source = _cluster_address(cfg)
    if address is not None:
        if _gcs_answers(address):
            ray.init(address=address, **kwargs)
            return True
        if source in ("--ray-address", "RAY_ADDRESS"):
            raise UsageError(f"no Ray cluster answers at {address} (from {source}) within "
                             f"{GCS_PROBE_TIMEOUT_S:g} s; start it, or pass --ray-address local "
                             "for a private one")
        print(f"batch: the Ray cluster recorded in {source} ({address}) does not answer; "
              "starting a private local Ray", file=out, flush=True)
    # Ray reads its auth mode from the environment when it starts: set it explicitly, first.
    os.environ["RAY_AUTH_MODE"] = cfg.ray_auth_mode
    repo_root = str(Path(__file__).resolve().parent.parent)
    ray.init(address="local", num_cpus=cfg.num_cpus, **kwargs,
             runtime_env={"env_vars": {"PYTHONPATH": repo_root}})
    return True


# ------------------------------------------------------------------------------------ run
def run_key(cfg: RunConfig, model: str) -> str:
    """What makes two runs' results interchangeable: model, options, diarization."""
    request = cfg.request()
    diar = "off" if not cfg.diarize else ",".join(f"{k}={v}" for k, v in request.speakers.as_kwargs().items())
    return f"model={model}|{request.asr_options.cache_key()}|diarize={diar}"


def run(cfg: RunConfig, *, out=sys.stdout) -> Summary:  # noqa: ANN001 - a text stream
    """One bulk run: list, skip what is done, transcribe the rest, write, summarise."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from config.settings import get_settings
    from pipelines import stages
    from pipelines.assemble import Assembler

    settings = get_settings()
    if not cfg.output and not cfg.db:
        raise UsageError("give --output, --db, or both")
    if cfg.db and not cfg.user:
        raise UsageError("--db needs --user EMAIL (the owner of the jobs)")
    for fmt in cfg.formats:
        if fmt not in SUBTITLE_FORMATS:
            raise UsageError(f"unknown --format {fmt!r}; one of {', '.join(SUBTITLE_FORMATS)}")
    if cfg.formats and not cfg.output:
        raise UsageError("--format writes next to --output; give --output")
    request = cfg.request()
    model = cfg.model or settings.WHISPER_MODEL_PATH
    _precheck(cfg, request, model=model, cache_dir=settings.MODEL_CACHE_DIR)
    key = run_key(cfg, model)

    try:
        paths = list_inputs(cfg.inputs)
    except InputError as exc:
        raise UsageError(str(exc)) from exc

    jsonl = resolve_output(cfg.output) if cfg.output else None
    previous = read_records(jsonl) if jsonl else {}
    by_sha = {r.sha256: r for r in previous.values() if r.sha256 and r.run_key == key and
              (r.status == "succeeded" or not cfg.retry_failed)}
    done = set(by_sha)
    sink = None
    if cfg.db:
        from pipelines.db_sink import DbSink, UnknownUserError

        try:
            sink = DbSink(email=cfg.user or "", run_key=key, url=cfg.db_url,
                          options={"model": model, **request.to_dict()})
        except UnknownUserError as exc:
            raise UsageError(str(exc)) from exc
        db_done = sink.done_hashes(include_failed=not cfg.retry_failed)
        # with both sinks, a file counts as done only where both have it
        done = (done & db_done) if jsonl else db_done

    summary = Summary(files=len(paths))
    # Quick check (as rsync does): a local file with the size and mtime of its done record is not
    # even read again; everything else is hashed in the CPU stage and skipped there when known.
    stats = {p: _stat(p) for p in paths}
    unchanged = [p for p in paths if _unchanged(previous.get(p), stats[p], key, cfg.retry_failed)
                 and (sink is None or previous[p].sha256 in done)]
    summary.skipped = len(unchanged)
    todo = [p for p in paths if p not in set(unchanged)]
    if not todo:
        print(f"batch: all {len(paths)} files done before; nothing to do", file=out, flush=True)
        print(summary.table(), file=out, flush=True)
        return summary
    started_here = _connect(cfg, out=out)
    t0 = time.perf_counter()
    writer = JsonlWriter(jsonl) if jsonl else None
    saved_ctx = None
    try:
        resources = ray.cluster_resources()
        gpus = cfg.num_gpus_per_actor
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) > 0 and settings.AI_DEVICE != "cpu" else 0.0
        device = "cuda" if gpus > 0 else "cpu"
        actors, batch_windows, threads = _actor_plan(cfg, resources, gpus, pools=2 if cfg.diarize else 1)
        summary.actors, summary.threads = actors, threads
        actor_cpus = _actor_cpus(resources.get("CPU", 1.0), actors, pools=2 if cfg.diarize else 1, gpus=gpus)
        print(f"batch: {len(paths)} files ({len(done)} known done), model {model} on {device}, "
              f"{actors} Whisper actor(s) x {gpus:g} GPU, {batch_windows} windows per batch", file=out, flush=True)
        if sink:
            sink.audit("batch.started", {"files": len(paths), "model": model, "run": key})

        ctx = ray.data.DataContext.get_current()
        saved_ctx = (ctx.enable_progress_bars, ctx.target_max_block_size)
        ctx.enable_progress_bars = bool(getattr(out, "isatty", lambda: False)())
        # Blocks of about one model batch of windows: Ray Data hands an actor whole blocks, and
        # at its default 128 MiB a long file's windows (~65 per block) would all go to one
        # actor while the others idle.
        ctx.target_max_block_size = batch_windows * stages.WINDOW_BYTES
        common = {"options": request.asr_options, "device": device}
        ds = ray.data.from_items([{"path": p} for p in todo],
                                 override_num_blocks=max(1, min(len(todo), 32 * int(resources.get("CPU", 1)))))
        # Half a CPU per decode task: one thread each, often waiting on storage; and resources
        # unlike the actors' keep Ray Data from fusing decoding into the Whisper actors, which
        # would run it there and limit each model batch to the files of one input block.
        ds = ds.map_batches(stages.decode_files, batch_size=1, num_cpus=DECODE_CPUS, batch_format="numpy",
                            fn_kwargs={**common, "done": frozenset(done), "split": not cfg.diarize,
                                       "limits": AudioLimits(max_bytes=settings.AUDIO_MAX_FILE_SIZE,
                                                             max_duration_s=settings.AUDIO_MAX_DURATION_S)})
        if cfg.diarize:
            ds = ds.map_batches(
                stages.DiarizeStage, batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                num_gpus=gpus / 2 if gpus else 0, num_cpus=actor_cpus,
                fn_constructor_kwargs={"spec": settings.DIARIZATION_MODEL_PATH, "device": device,
                                       "hf_token": settings.HF_TOKEN, "hints": request.speakers, "threads": threads})
            ds = ds.map_batches(stages.split_files, batch_size=1, num_cpus=DECODE_CPUS, batch_format="numpy", fn_kwargs=common)
        ds = ds.map_batches(
            stages.WhisperStage, batch_size=batch_windows, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
            num_gpus=(gpus / 2 if cfg.diarize else gpus) if gpus else None, num_cpus=actor_cpus,
            fn_constructor_kwargs={"model": model, "device": device, "cache_dir": str(settings.MODEL_CACHE_DIR),
                                   "batch_windows": batch_windows, "options": request.asr_options, "threads": threads})

        assembler = Assembler(request=request, run_key=key)
        root = cfg.inputs[0].rstrip("/") + "/" if len(cfg.inputs) == 1 and _is_dir(cfg.inputs[0]) else None
        last = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for row in stages.to_rows(batch):
                summary.decode_s += row["decode_s"]
                summary.model_s += row["model_s"]
                summary.windows += int(row["model_s"] > 0)
                if row["status"] == "skipped":
                    summary.skipped += 1
                    prior = by_sha.get(row["sha256"])
                    if writer and prior is not None and row["path"] not in previous:
                        writer.write(FileRecord(**{**prior.__dict__, "path": row["path"]}))  # same bytes, new name
                    continue
                record = assembler.add(row)
                if record is None:
                    continue
                if record.status == "succeeded":
                    summary.succeeded += 1
                    summary.audio_s += record.duration or 0.0
                else:
                    summary.failed += 1
                    summary.failures.append(record)
                record.mtime_ns = stats[record.path][1] if stats.get(record.path) else None
                if writer:
                    writer.write(record)
                    write_formats(record, cfg.formats, jsonl.parent, root)  # type: ignore[union-attr]
                if sink:
                    sink.write(record)
            now = time.perf_counter()
            if now - last >= cfg.progress_every_s:
                last = now
                _progress(summary, now - t0, assembler.in_flight, out)
        summary.wall_s = time.perf_counter() - t0
        if sink:
            sink.audit("batch.finished", {"files": summary.files, "succeeded": summary.succeeded,
                                          "failed": summary.failed, "skipped": summary.skipped,
                                          "audio_s": round(summary.audio_s, 1), "wall_s": round(summary.wall_s, 1)})
    finally:
        if saved_ctx is not None:
            ctx.enable_progress_bars, ctx.target_max_block_size = saved_ctx
        if writer:
            writer.close()
            writer.compact()
        if started_here:
            ray.shutdown()
    print(summary.table(), file=out, flush=True)
    return summary


def _actor_plan(cfg: RunConfig, resources: dict[str, float], gpus: float, *,
                pools: int) -> tuple[int, int, int | None]:
    """(actors per pool, windows per model batch, torch threads per actor) unless given.

    GPU: one actor per `gpus` share, 32 windows. CPU: one single-threaded actor per CPU (shared
    among the `pools`: Whisper, and diarization with --diarize), 8 windows. Measured on 2 cores
    with tiny.en: a second torch thread makes the encoder 2x faster but the decoder, a chain of
    small matrix products, only ~1.3x, so two one-thread actors outrun one two-thread actor by
    ~25%. One thread is also what the online ASR replica runs (serve_config.yaml, num_cpus 1), so
    the two paths compute the same numbers. Each actor holds its own model (tiny.en ~0.5 GB;
    give --actors for larger models).
    """
    if gpus > 0:
        actors = cfg.actors or max(1, int(resources.get("GPU", 0) // gpus))
        return actors, cfg.batch_windows or 32, cfg.threads_per_actor
    actors = cfg.actors or max(1, int(resources.get("CPU", 1)) // pools)
    threads = cfg.threads_per_actor or max(1, int(resources.get("CPU", 1)) // (actors * pools))
    return actors, cfg.batch_windows or 8, threads


def _actor_cpus(cpus: float, actors: int, *, pools: int, gpus: float) -> float:
    """Logical CPUs per actor: 0.5 beside a GPU; on CPU one each, less where the actor pools
    would otherwise take every CPU of the cluster and leave none for the decode (and split)
    tasks that feed them, which then never run (e.g. --diarize on 2 CPUs: two pools of 1)."""
    if gpus:
        return 0.5
    share = (cpus - DECODE_CPUS) / (pools * actors)
    if share < 0.1:
        raise UsageError(f"the cluster's {cpus:g} CPUs cannot hold {pools * actors} actor(s) and a "
                         f"decode task; give fewer --actors or more CPUs")
    return min(1.0, share)


def _progress(s: Summary, elapsed: float, in_flight: int, out) -> None:  # noqa: ANN001
    finished = s.succeeded + s.failed + s.skipped
    rate = s.audio_s / elapsed if elapsed > 0 else 0.0
    print(f"progress: {finished}/{s.files} files ({s.failed} failed, {s.skipped} skipped, {in_flight} in flight), "
          f"{s.audio_s / 3600:.2f} h audio in {elapsed:.0f} s, {rate:.1f}x real time", file=out, flush=True)


def _stat(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a local file; None for remote ones (always hashed)."""
    if is_remote(path):
        return None
    try:
        st = os.stat(path.removeprefix("file://"))
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _unchanged(prior: FileRecord | None, stat: tuple[int, int] | None, key: str, retry_failed: bool) -> bool:
    if prior is None or stat is None or prior.run_key != key or prior.mtime_ns is None:
        return False
    if prior.status != "succeeded" and (retry_failed or prior.status != "failed"):
        return False
    return (prior.size, prior.mtime_ns) == stat


def _is_dir(spec: str) -> bool:
    return not is_remote(spec) and os.path.isdir(spec.removeprefix("file://"))


def _precheck(cfg: RunConfig, request: TranscriptionRequest, *, model: str | None = None,
              cache_dir: Path | None = None) -> None:
    """Refuse impossible options before Ray starts or any file is read, with the rule every
    entry point uses, against what `model` can do as its metadata tells (no weights loaded;
    a model whose capabilities need a download is checked when the Whisper actors load)."""
    from speech.asr import model_capabilities

    try:
        caps = model_capabilities(model, cache_dir) if model else None
        check_request(request, caps)
        for name in ("actors", "batch_windows", "threads_per_actor"):
            value = getattr(cfg, name)
            if value is not None and value < 1:
                raise InvalidOptionError(name, f"--{name.replace('_', '-')} must be at least 1")
        if cfg.num_gpus_per_actor is not None and not (0 <= cfg.num_gpus_per_actor <= 8 and math.isfinite(cfg.num_gpus_per_actor)):
            raise InvalidOptionError("num_gpus_per_actor", "--num-gpus-per-actor must be between 0 and 8")
    except (InvalidOptionError, ModelNotFoundError) as exc:
        raise UsageError(str(exc)) from exc


# ------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> RunConfig:
    p = argparse.ArgumentParser(prog="python -m pipelines.batch_transcribe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="folder (recursive), glob, manifest (.txt/.tsv/.csv: a path per line) or file; "
                        "local or any pyarrow.fs URI (s3://, gs://, ...); repeatable")
    p.add_argument("--output", help="JSON Lines file (*.jsonl), or a folder to hold results.jsonl")
    p.add_argument("--format", dest="formats", nargs="+", default=[], choices=SUBTITLE_FORMATS,
                   help="also write this format per file next to the output (srt, vtt, ...)")
    p.add_argument("--db", action="store_true", help="record each file as a job in the service database")
    p.add_argument("--user", help="email of the user who owns the jobs (with --db)")
    p.add_argument("--model", help="Whisper model (default: WHISPER_MODEL_PATH)")
    p.add_argument("--language", help="ISO code; default: detect (multilingual models)")
    p.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    p.add_argument("--prompt", help="initial prompt for every window")
    p.add_argument("--word-timestamps", action="store_true")
    p.add_argument("--diarize", action="store_true", help="label speakers (pyannote, a second actor pool)")
    p.add_argument("--num-speakers", type=int)
    p.add_argument("--min-speakers", type=int)
    p.add_argument("--max-speakers", type=int)
    p.add_argument("--num-gpus-per-actor", type=float,
                   help="GPUs per Whisper actor, fractions allowed (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--actors", type=int, help="Whisper actors (default: one per GPU, or one per CPU)")
    p.add_argument("--batch-windows", type=int, help="30 s windows per model call (default 32 GPU, 8 CPU)")
    p.add_argument("--threads-per-actor", type=int, help="torch threads per actor on CPU (default: CPUs / all actors)")
    p.add_argument("--retry-failed", action="store_true", help="process files an earlier run recorded as failed")
    p.add_argument("--ray-address", help="cluster to use; 'local' starts a private one (default: RAY_ADDRESS, "
                                         "the cluster `ray start` recorded on this machine if it answers "
                                         "within 3 s, else a private one for this run)")
    p.add_argument("--ray-auth-mode", choices=("disabled", "token"), default="disabled",
                   help="RAY_AUTH_MODE of a private cluster started for the run")
    p.add_argument("--num-cpus", type=int, help="CPUs of a private cluster started for the run")
    a = p.parse_args(argv)
    return RunConfig(
        inputs=a.input, output=a.output, formats=a.formats, db=a.db, user=a.user, model=a.model,
        language=a.language, task=a.task, prompt=a.prompt, word_timestamps=a.word_timestamps, diarize=a.diarize,
        num_speakers=a.num_speakers, min_speakers=a.min_speakers, max_speakers=a.max_speakers,
        num_gpus_per_actor=a.num_gpus_per_actor, actors=a.actors, batch_windows=a.batch_windows,
        threads_per_actor=a.threads_per_actor, retry_failed=a.retry_failed, ray_address=a.ray_address,
        ray_auth_mode=a.ray_auth_mode, num_cpus=a.num_cpus,
    )


def main(argv: list[str] | None = None) -> int:
    from config.logging_setup import configure_logging
    from config.settings import SettingsError, get_settings

    cfg = parse_args(argv)
    try:
        settings = get_settings()
        configure_logging(settings.LOG_LEVEL, settings.LOG_FILE)
        return run(cfg).exit_code
    except (UsageError, SpeechError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
