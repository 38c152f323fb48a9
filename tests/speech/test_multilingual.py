"""The multilingual `base` model on real German and French speech (FLEURS, tests/data/fleurs_multilingual):
language detection with its probabilities, windows of different detected languages in one batch,
translation into English, a forced wrong language, and what a model can do read without loading it."""

from __future__ import annotations

import json

import pytest

from speech.formats import render
from speech.types import TranscribeOptions, Transcript
from tests.conftest import MIXED_LANGUAGE_CLIPS as MIXED

CLIPS = {"de": ["fleurs-de-004.ogg", "fleurs-de-005.ogg"], "fr": ["fleurs-fr-005.ogg", "fleurs-fr-008.ogg"]}
ENGLISH_FUNCTION_WORDS = {"the", "a", "of", "to", "in", "and", "is", "with", "that", "for", "from"}
SOURCE_COMMON_WORDS = {  # the commonest words of German and French text, none of them English
    "de": {"der", "die", "das", "und", "ist", "nicht", "sich", "von", "zu", "den", "mit", "ein", "eine"},
    "fr": {"le", "la", "les", "et", "est", "des", "du", "une", "un", "que", "qui", "dans", "pour"},
}


def _words(text: str) -> set[str]:
    import unicodedata

    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return set(text.split())


@pytest.fixture(scope="module")
def base_engine(base_model_dir, model_cache_dir):
    from speech.asr import WhisperEngine

    engine = WhisperEngine("base", cache_dir=model_cache_dir)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def clips(speech_data_dir, decode):
    folder = speech_data_dir / "fleurs_multilingual"
    return {lang: [(decode(folder / name), (folder / name).with_suffix(".txt").read_text()) for name in names]
            for lang, names in CLIPS.items()}


@pytest.fixture(scope="module")
def detected(base_engine, clips) -> dict[str, list[Transcript]]:
    """Every clip transcribed without `language=`, all in one batch."""
    flat = [(lang, audio) for lang, items in clips.items() for audio, _ in items]
    out = base_engine.transcribe([a for _, a in flat], TranscribeOptions())
    return {lang: [t for (lg, _), t in zip(flat, out, strict=True) if lg == lang] for lang in clips}


@pytest.mark.parametrize("lang", ["de", "fr"])
def test_german_and_french_are_detected_and_transcribed(detected, clips, lang):
    for transcript, (_, reference) in zip(detected[lang], clips[lang], strict=True):
        assert transcript.language == lang, transcript.text
        # the words a transcript of this language cannot miss
        common = SOURCE_COMMON_WORDS[lang] & _words(reference)
        assert len(common & _words(transcript.text)) >= len(common) / 2, (transcript.text, reference)


@pytest.mark.parametrize("lang", ["de", "fr"])
def test_detection_reports_its_confidence_in_verbose_json(detected, lang):
    for transcript in detected[lang]:
        probs = transcript.language_probs
        assert probs is not None and list(probs)[0] == lang, probs
        assert probs[lang] >= 0.9 and sum(probs.values()) <= 1.0001
        assert list(probs.values()) == sorted(probs.values(), reverse=True)
        body = json.loads(render(transcript, "verbose_json"))
        assert body["language"] == {"de": "german", "fr": "french"}[lang]
        assert body["language_probs"] == probs
        assert Transcript.from_dict(json.loads(json.dumps(transcript.to_dict()))).language_probs == probs


def _comparable(t: Transcript) -> tuple:
    return t.language, t.text, [(s.start, s.end, s.text) for s in t.segments]


def test_one_batch_of_german_english_and_french_equals_each_clip_alone(base_engine, decode, speech_data_dir,
                                                                       monkeypatch):
    """No `language=`: the three windows share one decoding batch (same options), and each keeps
    its own detected language token: language, text and segment times as when decoded alone."""
    audios = {lang: decode(speech_data_dir / clip) for lang, clip in MIXED.items()}
    batches: list[int] = []
    group = base_engine._transcribe_group

    def recorded(windows, depth=0, *rest, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if depth == 0:  # deeper calls re-decode parts of these windows
            batches.append(len(windows))
        return group(windows, depth, *rest, **kw)

    monkeypatch.setattr(base_engine, "_transcribe_group", recorded)
    together = dict(zip(MIXED, base_engine.transcribe(list(audios.values()), TranscribeOptions()), strict=True))
    assert batches == [len(MIXED)], f"the three windows were not decoded in one batch: {batches}"
    batches.clear()
    alone = {lang: base_engine.transcribe([audio], TranscribeOptions())[0] for lang, audio in audios.items()}
    assert batches == [1] * len(MIXED)
    for lang in MIXED:
        assert together[lang].language == lang, (lang, together[lang].language_probs)
        assert _comparable(together[lang]) == _comparable(alone[lang]), lang
        assert together[lang].language_probs[lang] == pytest.approx(alone[lang].language_probs[lang], abs=1e-3)


def test_a_given_language_reports_no_detection_and_old_transcripts_still_load(base_engine, clips):
    given = base_engine.transcribe([clips["fr"][0][0]], TranscribeOptions(language="fr"))[0]
    assert given.language == "fr" and given.language_probs is None
    assert "language_probs" not in json.loads(render(given, "verbose_json"))
    old = given.to_dict()
    del old["language_probs"]  # a transcript stored before the field existed
    assert Transcript.from_dict(old).language_probs is None


def test_translation_is_english(base_engine, clips):
    flat = [(lang, audio) for lang, items in clips.items() for audio, _ in items]
    out = base_engine.transcribe([a for _, a in flat], TranscribeOptions(task="translate"))
    for (lang, _), transcript in zip(flat, out, strict=True):
        words = _words(transcript.text)
        assert transcript.task == "translate" and transcript.language == lang
        assert words & ENGLISH_FUNCTION_WORDS, transcript.text
        assert not words & SOURCE_COMMON_WORDS[lang], transcript.text


def test_a_forced_wrong_language_still_returns_text(base_engine, clips):
    transcript = base_engine.transcribe([clips["fr"][1][0]], TranscribeOptions(language="de"))[0]
    assert transcript.language == "de" and transcript.text.strip()


def test_capabilities_are_read_without_loading_the_model(base_engine, tiny_engine, monkeypatch):
    import transformers

    from speech.asr import model_capabilities

    monkeypatch.setattr(transformers.WhisperForConditionalGeneration, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    for engine in (base_engine, tiny_engine):
        caps = model_capabilities(engine.model_spec, engine.cache_dir)
        loaded = engine.capabilities()
        assert (caps.multilingual, caps.languages) == (loaded.multilingual, loaded.languages)
    assert model_capabilities("base").multilingual and "fr" in model_capabilities("base").languages
    assert model_capabilities("tiny.en").languages == ("en",)
    assert model_capabilities("openai/whisper-tiny") is None  # a hub id: known once loaded
