"""Fixtures shared across the test packages: real speech data and the converted offline models.

The recordings live in the repository (tests/data, see its README.md and MANIFEST.tsv), so a
fresh clone runs the suite without anything beside it; the benchmarks (bench/) use the larger
recordings of the project's shared data instead.

The packaged Whisper models are converted once into the real model cache
(Settings.MODEL_CACHE_DIR), so every test session after the first only loads them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEECH_DATA_DIR = REPO_ROOT / "tests" / "data"
"""Real recordings with their references, kept in the repository (tests/data/README.md)."""
MIXED_LANGUAGE_CLIPS = {"de": "fleurs_multilingual/fleurs-de-004.ogg", "en": "jfk/jfk.flac",
                        "fr": "fleurs_multilingual/fleurs-fr-005.ogg"}
"""One clip per language (under SPEECH_DATA_DIR), each one window of 7-11 s: a batch that mixes
detected languages, for the engine, the service and the bulk pipeline alike."""


@pytest.fixture(scope="session")
def speech_data_dir() -> Path:
    if not SPEECH_DATA_DIR.is_dir():
        pytest.fail(f"the test recordings are missing: {SPEECH_DATA_DIR} (tests/data in the repository)")
    return SPEECH_DATA_DIR


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    from config.settings import get_settings

    return get_settings().MODEL_CACHE_DIR


@pytest.fixture(scope="session")
def tiny_en_model_dir(model_cache_dir: Path) -> Path:
    """transformers directory of the packaged tiny.en (English-only), converted once."""
    from speech.model_store import resolve_whisper_model

    return Path(resolve_whisper_model("tiny.en", model_cache_dir))


@pytest.fixture(scope="session")
def base_model_dir(model_cache_dir: Path) -> Path:
    """transformers directory of the packaged base (multilingual), converted once."""
    from speech.model_store import resolve_whisper_model

    return Path(resolve_whisper_model("base", model_cache_dir))


@pytest.fixture(scope="session")
def tiny_engine(tiny_en_model_dir: Path, model_cache_dir: Path):
    """The packaged tiny.en engine as the service runs it on CPU, loaded once per session."""
    from speech.asr import WhisperEngine

    engine = WhisperEngine("tiny.en", device="cpu", cache_dir=model_cache_dir)
    engine.load()
    return engine


@pytest.fixture(scope="session")
def decode():
    """Decode a file of the test data to the engine's 16 kHz mono float32."""
    from speech.audio import decode_audio

    return decode_audio


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test, as the pipeline's CPU actors and the online ASR replica
    run it: with another thread count text and times are the same but scores such as
    avg_logprob differ in the seventh digit (float sums are split differently)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
