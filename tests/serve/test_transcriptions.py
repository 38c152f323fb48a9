"""POST /v1/audio/transcriptions through the real `openai` client, on real recordings.

Text is checked against the references (Whisper's English normaliser, corpus WER), timestamps
against the audio's own duration; every response format and both timestamp granularities.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from speech.evaluation import word_error_rate
from tests.serve.support import JFK, LIBRI, SHORT_CLIPS, reference

JFK_SECONDS = 11.0
CLOCK = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)")


def transcribe(client, path, **kwargs):  # noqa: ANN001, ANN201
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(file=(path.name, f), model="whisper-1", **kwargs)


def cue_times(body: str) -> list[tuple[float, float]]:
    out = []
    for m in CLOCK.finditer(body):
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, m.groups())
        out.append((h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000))
    return out


def cue_text(body: str) -> str:
    """Subtitle text without headers, numbers and timing lines."""
    lines = [ln for ln in body.splitlines()
             if ln.strip() and ln.strip() != "WEBVTT" and not ln.strip().isdigit()
             and "-->" not in ln]
    return " ".join(lines)


def test_json_gives_the_text_of_the_recording(openai_client) -> None:  # noqa: ANN001
    result = transcribe(openai_client, JFK)
    wer = word_error_rate([reference(JFK)], [result.text])
    assert wer <= 0.10, f"WER {wer:.2f}: {result.text!r}"


def test_text_format_is_plain_text(openai_client) -> None:  # noqa: ANN001
    body = transcribe(openai_client, LIBRI, response_format="text")
    assert isinstance(body, str) and not body.lstrip().startswith("{")
    wer = word_error_rate([reference(LIBRI)], [body])
    assert wer <= 0.15, f"WER {wer:.2f}: {body!r}"


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_carry_the_text_on_the_recordings_clock(openai_client, fmt: str) -> None:  # noqa: ANN001
    body = transcribe(openai_client, JFK, response_format=fmt)
    assert isinstance(body, str)
    if fmt == "vtt":
        assert body.startswith("WEBVTT")
    else:
        assert body.lstrip().startswith("1\n")
    cues = cue_times(body)
    assert cues, body
    assert all(0 <= start < end <= JFK_SECONDS + 0.05 for start, end in cues), cues
    assert all(a[0] <= b[0] for a, b in zip(cues, cues[1:])), cues
    wer = word_error_rate([reference(JFK)], [cue_text(body)])
    assert wer <= 0.10, f"WER {wer:.2f}: {body!r}"


def test_verbose_json_has_segments_language_and_duration(openai_client) -> None:  # noqa: ANN001
    result = transcribe(openai_client, JFK, response_format="verbose_json")
    assert result.language == "english"
    assert abs(result.duration - JFK_SECONDS) < 0.1
    assert result.segments and not result.words
    assert all(0 <= s.start < s.end <= JFK_SECONDS + 0.05 for s in result.segments)
    joined = " ".join(s.text for s in result.segments)
    assert word_error_rate([reference(JFK)], [joined]) <= 0.10, joined


def test_word_granularity_gives_timed_words_only(openai_client) -> None:  # noqa: ANN001
    result = transcribe(openai_client, JFK, response_format="verbose_json",
                        timestamp_granularities=["word"])
    assert result.words and not result.segments
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= JFK_SECONDS + 0.05 for w in result.words)
    text = " ".join(w.word for w in result.words)
    assert word_error_rate([reference(JFK)], [text]) <= 0.10, text
    country = [w for w in result.words if "country" in w.word.lower()]
    assert len(country) == 2 and country[0].start < 8.0 < country[1].start, country


def test_both_granularities_give_segments_and_words(openai_client) -> None:  # noqa: ANN001
    result = transcribe(openai_client, JFK, response_format="verbose_json",
                        timestamp_granularities=["word", "segment"])
    assert result.segments and result.words
    for word in result.words:
        assert any(s.start - 0.05 <= word.start <= s.end + 0.05 for s in result.segments), word


def test_several_clips_at_once_all_come_back_right(openai_client) -> None:  # noqa: ANN001
    with ThreadPoolExecutor(len(SHORT_CLIPS)) as pool:
        texts = list(pool.map(lambda p: transcribe(openai_client, p).text, SHORT_CLIPS))
    wer = word_error_rate([reference(p) for p in SHORT_CLIPS], texts)
    assert wer <= 0.15, f"WER {wer:.2f}: {texts}"


def test_prompt_and_language_are_accepted(openai_client) -> None:  # noqa: ANN001
    result = transcribe(openai_client, JFK, language="en", prompt="Inaugural address.",
                        temperature=0.0)
    assert word_error_rate([reference(JFK)], [result.text]) <= 0.10, result.text


def test_translation_with_an_english_only_model_names_the_model(openai_client) -> None:  # noqa: ANN001
    import openai

    with pytest.raises(openai.BadRequestError) as info, open(JFK, "rb") as f:
        openai_client.audio.translations.create(file=("jfk.flac", f), model="whisper-1")
    assert info.value.body["param"] == "model", info.value.body


DIARIZATION_SAMPLE = JFK.parent.parent / "pyannote_sample" / "sample.wav"


def test_diarized_json_labels_the_two_speakers_of_a_call(service, openai_client) -> None:  # noqa: ANN001
    with open(DIARIZATION_SAMPLE, "rb") as f:
        raw = openai_client.audio.transcriptions.with_raw_response.create(
            file=("sample.wav", f), model="whisper-1", response_format="diarized_json",
            extra_body={"num_speakers": "2"})
    body = json.loads(raw.http_response.text)
    speakers = {s["speaker"] for s in body["segments"]}
    assert len(speakers) == 2, body["segments"]
    assert body["text"] and all(s["start"] < s["end"] for s in body["segments"])


def test_diarize_flag_adds_speakers_to_verbose_json(openai_client) -> None:  # noqa: ANN001
    with open(DIARIZATION_SAMPLE, "rb") as f:
        raw = openai_client.audio.transcriptions.with_raw_response.create(
            file=("sample.wav", f), model="whisper-1", response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            extra_body={"diarize": "true", "min_speakers": "1", "max_speakers": "3"})
    body = json.loads(raw.http_response.text)
    assert {w.get("speaker") for w in body["words"]} - {None}, body["words"][:5]
    assert all("speaker" in s for s in body["segments"])
