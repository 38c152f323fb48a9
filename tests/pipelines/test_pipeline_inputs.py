"""Which files a bulk run covers, and how its output is read back (no Ray, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.inputs import InputError, list_inputs
from pipelines.records import FileRecord, JsonlWriter, read_records, resolve_output, subtitle_path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ["a.wav", "b.flac", "deep/er/c.mp3", "notes.md", "deep/cover.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_a_folder_is_listed_recursively_keeping_audio_only(tree: Path) -> None:
    got = list_inputs([str(tree)])
    assert [Path(p).relative_to(tree).as_posix() for p in got] == ["a.wav", "b.flac", "deep/er/c.mp3"]


def test_a_glob_and_a_manifest_name_files_and_duplicates_collapse(tree: Path) -> None:
    manifest = tree / "list.tsv"
    manifest.write_text("path\tnote\n# a comment\na.wav\tfirst\n" + str(tree / "deep/er/c.mp3") + "\n")
    got = list_inputs([str(tree / "**" / "*.mp3"), str(manifest)])
    assert [Path(p).name for p in got] == ["a.wav", "c.mp3"]


def test_a_pyarrow_uri_is_listed_like_a_folder(tree: Path) -> None:
    assert [Path(p).name for p in list_inputs([f"file://{tree}"])] == ["a.wav", "b.flac", "c.mp3"]


def test_inputs_that_name_nothing_are_refused_by_name(tree: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        list_inputs([str(tree / "missing")])
    with pytest.raises(InputError, match="matches no audio"):
        list_inputs([str(tree / "*.ogg")])


def test_the_output_keeps_the_last_record_per_file_and_survives_a_torn_line(tmp_path: Path) -> None:
    out = resolve_output(str(tmp_path / "run"))
    assert out.name == "results.jsonl"
    writer = JsonlWriter(out)
    common = dict(sha256="ab", size=1, run_key="k")
    writer.write(FileRecord.failed(path="/x.wav", error="boom", error_code="corrupt_audio", **common))
    writer.write(FileRecord.failed(path="/x.wav", error="again", error_code="corrupt_audio", **common))
    writer.close()
    with out.open("a") as fh:
        fh.write('{"path": "/y.wav", "sha')  # the run was killed mid-line
    writer.compact()
    records = read_records(out)
    assert list(records) == ["/x.wav"] and records["/x.wav"].error == "again"
    assert len(out.read_text().splitlines()) == 1


def test_subtitles_mirror_the_input_tree(tmp_path: Path) -> None:
    assert subtitle_path(tmp_path, "/in/a/b.wav", "/in/", "srt") == tmp_path / "a" / "b.wav.srt"
    assert subtitle_path(tmp_path, "s3://bucket/x/y.flac", None, "vtt") == tmp_path / "y.flac.vtt"
