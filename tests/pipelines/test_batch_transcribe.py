"""The bulk pipeline end to end on a private local Ray: real clips, a corrupt and an empty file.

One run over the folder (Postgres sink and JSON Lines together), then the same run again. Each
test reads that run's results: accuracy against the references, equality with the engine called
directly on the same file, failures recorded with their reasons, nothing redone on the re-run,
and the jobs visible through GET /v1/jobs to their owner only.
"""

from __future__ import annotations

import json

import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.batch_transcribe import RunConfig, Summary, UsageError, run
from pipelines.records import FileRecord, read_records
from speech.evaluation import word_error_rate
from tests.db.support import configure, make_app, make_caller, pg_url  # noqa: F401 - pg_url is a fixture

REPO = Path(__file__).resolve().parents[2]
OWNER = "batch-owner@example.org"
CLIPS = {  # name in the temp folder -> clip in tests/data (its reference transcript beside it)
    "jfk.flac": "jfk/jfk.flac",
    "leopard.wav": "picovoice_leopard/test.wav",
    "nested/cards-001.wav": "pocketsphinx/cards/001.wav",
    "nested/LJ002-0035.wav": "lhotse_fixtures/LJ002-0035.wav",
}


@dataclass
class Runs:
    folder: Path
    output: Path
    first: Summary
    second: Summary
    first_text: str
    records: dict[str, FileRecord]
    db_url: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, speech_data_dir: Path, pg_url: str) -> Iterator[Runs]:  # noqa: F811
    os.environ["RAY_AUTH_MODE"] = "disabled"  # explicit: Ray 2.60 turns token auth on otherwise
    import ray

    from db import repository as repo
    from db.session import session_scope

    folder = tmp_path_factory.mktemp("batch-in")
    for name, clip in CLIPS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(speech_data_dir / clip, folder / name)
    flac = (speech_data_dir / "lhotse_fixtures" / "2412-153948-0000.flac").read_bytes()
    (folder / "corrupt.flac").write_bytes(flac[:3000])  # the header and no audio frames
    (folder / "nested" / "empty.wav").write_bytes(b"")
    output = tmp_path_factory.mktemp("batch-out") / "out.jsonl"
    with session_scope(pg_url) as session:
        if repo.get_user_by_email(session=session, email=OWNER) is None:
            repo.create_user(session=session, email=OWNER)

    cfg = RunConfig(inputs=[str(folder)], output=str(output), formats=["srt"], db=True, user=OWNER,
                    db_url=pg_url, model="tiny.en", batch_windows=1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        first = run(cfg, out=io.StringIO())
        first_text = output.read_text()
        second = run(cfg, out=io.StringIO())
    finally:
        ray.shutdown()
    yield Runs(folder, output, first, second, first_text, read_records(output), pg_url)


def _rec(runs: Runs, name: str) -> FileRecord:
    return runs.records[str(runs.folder / name)]


def test_every_file_has_one_record_and_the_summary_counts_them(runs: Runs) -> None:
    assert len(runs.records) == len(CLIPS) + 2
    assert (runs.first.files, runs.first.succeeded, runs.first.failed) == (6, 4, 2)
    assert runs.first.exit_code == 1  # some files failed: the run says so
    assert runs.first.audio_s == pytest.approx(11.0 + 5.86 + 1.10 + 1.60, abs=0.1)
    # where the time went: one 30 s window per clip, time inside the model and in the CPU stage
    assert runs.first.windows == len(CLIPS)
    assert runs.first.model_s > 0 and runs.first.decode_s > 0


def test_cpu_actors_default_to_one_thread_each() -> None:
    """One single-threaded Whisper actor per CPU (shared with the diarization pool), as the
    online replicas run; on GPUs one actor per GPU share and larger batches."""
    from pipelines.batch_transcribe import _actor_plan

    cfg = RunConfig(inputs=["x"])
    assert _actor_plan(cfg, {"CPU": 2.0}, 0.0, pools=1) == (2, 8, 1)
    assert _actor_plan(cfg, {"CPU": 2.0}, 0.0, pools=2) == (1, 8, 1)
    assert _actor_plan(cfg, {"CPU": 16.0, "GPU": 4.0}, 1.0, pools=1) == (4, 32, None)
    assert _actor_plan(RunConfig(inputs=["x"], actors=1, batch_windows=4), {"CPU": 4.0}, 0.0, pools=1) == (1, 4, 4)


def test_transcripts_match_the_references(runs: Runs, speech_data_dir: Path) -> None:
    refs, hyps = [], []
    for name, clip in CLIPS.items():
        rec = _rec(runs, name)
        assert rec.status == "succeeded" and rec.language == "en", rec
        refs.append((speech_data_dir / clip).with_suffix(".txt").read_text())
        hyps.append(rec.text)
    wer = word_error_rate(refs, hyps)
    print(f"pipeline WER on {len(refs)} clips: {wer:.3f}")
    assert wer <= 0.10, list(zip(refs, hyps))


@pytest.mark.usefixtures("one_torch_thread")
def test_transcripts_equal_the_engine_called_directly(runs: Runs, speech_data_dir: Path, model_cache_dir: Path) -> None:
    """Same file, same options: the pipeline's transcript is the engine's, field for field."""
    from pipelines.stages import window_rows
    from speech.asr import WhisperEngine
    from speech.audio import decode_audio
    from speech.types import TranscribeOptions

    engine = WhisperEngine("tiny.en", cache_dir=model_cache_dir)
    for name in CLIPS:
        audio = decode_audio(runs.folder / name)
        direct = engine.transcribe([audio], TranscribeOptions())[0]
        assert _rec(runs, name).transcript().to_dict() == direct.to_dict(), name
    # the CPU stage cuts exactly where the engine does, without loading the model
    long = decode_audio(speech_data_dir / "conv2spk_75s.flac")  # 76.5 s of conversation
    spans = [(w.offset_s, len(w.samples), w.speech) for w in engine.planner.plan(long, TranscribeOptions())]
    rows = window_rows({"path": "conv2spk_75s.flac"}, long, TranscribeOptions(), device="cpu")
    assert [(r["offset_s"], r["n_samples"], tuple(map(tuple, json.loads(r["speech"])))) for r in rows] == spans
    assert len(spans) >= 3


def test_bad_files_are_recorded_failed_with_their_reasons(runs: Runs) -> None:
    corrupt, empty = _rec(runs, "corrupt.flac"), _rec(runs, "nested/empty.wav")
    assert (corrupt.status, corrupt.error_code) == ("failed", "corrupt_audio")
    assert "FLAC" in (corrupt.error or "")
    assert (empty.status, empty.error_code) == ("failed", "empty_audio")
    assert empty.sha256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert corrupt.segments == [] and corrupt.language is None


def test_subtitles_are_written_per_file_mirroring_the_folders(runs: Runs) -> None:
    srt = runs.output.parent / "nested" / "cards-001.wav.srt"
    assert srt.read_text().startswith("1\n00:00:0")
    assert not (runs.output.parent / "corrupt.flac.srt").exists()


def test_a_second_run_processes_nothing_new(runs: Runs) -> None:
    s = runs.second
    assert (s.files, s.skipped, s.succeeded, s.failed, s.exit_code) == (6, 6, 0, 0, 0)
    assert runs.output.read_text() == runs.first_text


def test_the_jobs_are_listed_through_the_jobs_api_for_their_owner_only(
    runs: Runs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    configure(monkeypatch, DB_URL=runs.db_url, STORAGE_BASE_PATH=str(tmp_path), REDIS_URL=None, ENVIRONMENT="test")
    owner, other = make_caller(OWNER), make_caller("someone-else@example.org")
    with TestClient(make_app()) as client:
        listed = client.get("/v1/jobs?limit=100", headers=owner.headers).json()["data"]
        jobs = {j["filename"]: j for j in listed if j["source"] == "batch"}
        assert len(jobs) == 6, listed  # both runs together: one job per file
        assert jobs["empty.wav"]["status"] == "failed" and "empty" in jobs["empty.wav"]["error"]
        jfk = jobs["jfk.flac"]
        assert jfk["status"] == "succeeded" and jfk["duration"] == pytest.approx(11.0, abs=0.01)
        assert jfk["options"]["batch_id"].startswith("batch_")
        text = client.get(f"/v1/jobs/{jfk['id']}/transcript?format=text", headers=owner.headers)
        assert text.status_code == 200 and text.text.strip() == _rec(runs, "jfk.flac").text
        assert client.get("/v1/jobs", headers=other.headers).json()["data"] == []


def test_an_unknown_owner_is_refused_before_anything_runs(runs: Runs, tmp_path: Path) -> None:
    cfg = RunConfig(inputs=[str(runs.folder)], output=str(tmp_path / "o.jsonl"), db=True,
                    user="nobody@example.org", db_url=runs.db_url)
    with pytest.raises(UsageError, match="create-user"):
        run(cfg, out=io.StringIO())
    assert not (tmp_path / "o.jsonl").exists()
