"""`python -m speech transcribe`: the engine alone from the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import srt

from speech.cli import main
from speech.evaluation import normalize

REPO = Path(__file__).resolve().parents[2]


def test_one_file_to_standard_output_as_srt(speech_data_dir, tiny_en_model_dir):
    done = subprocess.run(
        [sys.executable, "-m", "speech", "transcribe", str(speech_data_dir / "jfk" / "jfk.flac"), "--format", "srt"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "LOG_LEVEL": "WARNING"},
    )
    assert done.returncode == 0, done.stderr
    cues = list(srt.parse(done.stdout))
    assert normalize(" ".join(c.content for c in cues)) == normalize((speech_data_dir / "jfk" / "jfk.txt").read_text())
    assert "real_time_factor=" in done.stderr  # the summary line


def test_a_folder_with_a_bad_file_writes_the_good_ones_and_fails(tmp_path, speech_data_dir, tiny_en_model_dir, capsys):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    shutil.copy(speech_data_dir / "jfk" / "jfk.flac", inputs / "jfk.flac")
    shutil.copy(speech_data_dir / "picovoice_leopard" / "test.wav", inputs / "sub" / "leopard.wav")
    (inputs / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    out = tmp_path / "out"

    code = main(["transcribe", str(inputs), "--format", "verbose_json", "--word-timestamps", "--output-dir", str(out), "--quiet"])

    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["jfk.json", "leopard.json"]
    body = json.loads((out / "jfk.json").read_text())
    assert body["language"] == "english" and body["words"]
    assert "broken.wav" in capsys.readouterr().err


def test_options_the_model_refuses_exit_2_before_any_decoding(speech_data_dir, tiny_en_model_dir, capsys):
    code = main(["transcribe", str(speech_data_dir / "jfk" / "jfk.flac"), "--task", "translate", "--quiet"])
    assert code == 2
    assert "translate" in capsys.readouterr().err


def test_diarize_labels_speakers_in_rttm(speech_data_dir, tiny_en_model_dir, capsys):
    """The two-person call, transcribed and diarized in one command, two speakers in RTTM."""
    code = main(["transcribe", str(speech_data_dir / "pyannote_sample" / "sample.wav"), "--diarize",
                 "--format", "rttm", "--quiet"])
    assert code == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("SPEAKER")]
    assert lines and {line[7] for line in lines} == {"SPEAKER_00", "SPEAKER_01"}
    assert all(float(line[4]) > 0 for line in lines)


def test_bad_speaker_hints_exit_2(speech_data_dir, tiny_en_model_dir, capsys):
    code = main(["transcribe", str(speech_data_dir / "jfk" / "jfk.flac"), "--diarize",
                 "--min-speakers", "3", "--max-speakers", "2", "--quiet"])
    assert code == 2
    assert "min_speakers" in capsys.readouterr().err


def test_a_language_the_model_lacks_exits_2_before_any_file_is_read(tmp_path, tiny_en_model_dir, capsys,
                                                                     monkeypatch):
    """tiny.en (the default model) knows English only: French is refused, naming the option,
    before the (here missing) file is opened."""
    from speech.pipeline import TranscriptionPipeline

    monkeypatch.setattr(TranscriptionPipeline, "load", lambda *_: pytest.fail("a file was read"))
    code = main(["transcribe", str(tmp_path / "never-read.wav"), "--model", "tiny.en", "--language", "fr",
                 "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'fr'" in err and "tiny.en" in err and "never-read" not in err
