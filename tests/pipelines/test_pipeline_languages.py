"""The bulk pipeline without `--language` on German, English and French files (multilingual `base`).

The files' windows have the same options, so the Whisper actor decodes them in one batch (one
actor, up to 8 windows a batch: Ray Data bundles the three one-window files into one call; the
stage records the files of each batch it decodes, and the test reads that). Each window must keep
its own detected language: every record carries the language, text and segment times of the engine
transcribing that file alone, in this process on one torch thread as the actor runs (scores are
not compared: they are the engine's own business, checked in tests/speech).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.batch_transcribe import RunConfig, Summary, run
from pipelines.records import FileRecord, read_records
from tests.conftest import MIXED_LANGUAGE_CLIPS

REPO = Path(__file__).resolve().parents[2]


def _name(lang: str) -> str:
    return f"{lang}{Path(MIXED_LANGUAGE_CLIPS[lang]).suffix}"


def _recording_stage(record: Path) -> type:
    """The Whisper stage, appending the files of each batch it decodes to `record` (one JSON list
    a line). Defined here, so Ray ships it to the actor by value."""
    from pipelines import stages

    class RecordingWhisperStage(stages.WhisperStage):
        def __call__(self, batch):  # noqa: ANN001, ANN204
            rows = [r for r in stages.to_rows(batch) if r["status"] == "ok"]
            with open(record, "a") as f:
                f.write(json.dumps([r["path"] for r in rows]) + "\n")
            return super().__call__(batch)

    return RecordingWhisperStage


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory, speech_data_dir: Path,
         base_model_dir: Path) -> Iterator[tuple[Path, Summary, dict[str, FileRecord], list[list[str]]]]:
    os.environ["RAY_AUTH_MODE"] = "disabled"  # explicit: Ray 2.60 turns token auth on otherwise
    import ray

    from pipelines import stages

    folder = tmp_path_factory.mktemp("languages-in")
    for lang, clip in MIXED_LANGUAGE_CLIPS.items():
        shutil.copyfile(speech_data_dir / clip, folder / _name(lang))
    output = tmp_path_factory.mktemp("languages-out") / "out.jsonl"
    record = output.with_name("batches.jsonl")
    cfg = RunConfig(inputs=[str(folder)], output=str(output), model="base", actors=1, batch_windows=8,
                    threads_per_actor=1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stages, "WhisperStage", _recording_stage(record))
            summary = run(cfg, out=io.StringIO())
    finally:
        ray.shutdown()
    batches = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    yield folder, summary, read_records(output), batches


@pytest.mark.usefixtures("one_torch_thread")
def test_each_file_keeps_its_language_and_the_text_it_has_alone(bulk, model_cache_dir: Path) -> None:  # noqa: ANN001
    from speech.asr import WhisperEngine
    from speech.audio import decode_audio
    from speech.types import TranscribeOptions

    folder, summary, records, batches = bulk
    assert (summary.files, summary.succeeded, summary.windows) == (3, 3, 3), summary
    files = sorted(str(folder / _name(lang)) for lang in MIXED_LANGUAGE_CLIPS)
    assert [sorted(b) for b in batches if b] == [files], f"the three files were not one batch: {batches}"
    engine = WhisperEngine("base", cache_dir=model_cache_dir)
    for lang in MIXED_LANGUAGE_CLIPS:
        rec = records[str(folder / _name(lang))]
        assert rec.status == "succeeded" and rec.language == lang, rec
        got = rec.transcript()
        alone = engine.transcribe([decode_audio(folder / _name(lang))], TranscribeOptions())[0]
        assert got.language == alone.language and got.text == alone.text, (lang, got.text, alone.text)
        assert [(s.start, s.end, s.text) for s in got.segments] == [
            (s.start, s.end, s.text) for s in alone.segments], lang
