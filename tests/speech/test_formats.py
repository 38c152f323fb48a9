"""render: a Transcript in every response format, shaped so that real parsers (the `srt` and
`webvtt-py` packages, OpenAI's own response models) read it back unchanged."""

from __future__ import annotations

import html
import json
from datetime import timedelta

import pytest
import srt
import webvtt
from openai.types.audio import (
    TranscriptionDiarized,
    TranscriptionDiarizedSegment,
    TranscriptionSegment,
    TranscriptionVerbose,
    TranscriptionWord,
)

from speech.errors import InvalidOptionError
from speech.formats import FORMATS, media_type, render
from speech.languages import LANGUAGE_NAMES
from speech.types import Segment, SpeakerTurn, Transcript, Word


def make_transcript(*, diarized: bool = True, words: bool = True) -> Transcript:
    seg = [
        Segment(
            id=0, start=0.0, end=2.5, text=" And so, my fellow Americans,", tokens=[50364, 400],
            avg_logprob=-0.2, compression_ratio=1.1, no_speech_prob=0.01,
            words=[Word(0.0, 0.4, " And"), Word(0.4, 0.8, " so,"), Word(0.9, 2.5, " Americans,")]
            if words else [],
        ),
        Segment(id=1, start=2.5, end=3.0, text=""),  # nothing said: no cue
        Segment(
            id=2, start=59.9996, end=3723.4567, text=" ask not <what> & -->\nwhat\tyou can do.",
            tokens=[1029], seek=3000,
        ),
    ]
    speakers = None
    if diarized:
        seg[0].speaker, seg[2].speaker = "SPEAKER_00", "SPEAKER_01"
        if words:
            for w in seg[0].words:
                w.speaker = "SPEAKER_00"
        speakers = [SpeakerTurn(0.0, 2.6, "SPEAKER_00"), SpeakerTurn(59.5, 3723.5, "SPEAKER_01")]
    return Transcript(language="en", duration=3724.0, segments=seg, speakers=speakers)


EMPTY = Transcript(language="en", duration=3.0, segments=[], speakers=[])


def test_json_is_openais_plain_shape() -> None:
    assert json.loads(render(make_transcript(), "json")) == {
        "text": "And so, my fellow Americans, ask not <what> & -->\nwhat\tyou can do."
    }
    assert json.loads(render(EMPTY, "json")) == {"text": ""}


def test_text_is_the_transcript_and_a_newline() -> None:
    assert render(make_transcript(), "text").startswith("And so, my fellow Americans,")
    assert render(make_transcript(), "text").endswith("can do.\n")
    assert render(EMPTY, "text") == ""


def test_srt_parses_back_with_the_same_cues() -> None:
    cues = list(srt.parse(render(make_transcript(), "srt")))
    assert [c.index for c in cues] == [1, 2]
    assert [(c.start, c.end) for c in cues] == [
        (timedelta(0), timedelta(seconds=2.5)),
        (timedelta(minutes=1), timedelta(hours=1, minutes=2, seconds=3, milliseconds=457)),
    ]
    assert cues[0].content == "[SPEAKER_00] And so, my fellow Americans,"
    assert cues[1].content == "[SPEAKER_01] ask not <what> & -> what\tyou can do."


def test_srt_timestamps_use_a_comma_and_always_show_hours() -> None:
    body = render(make_transcript(), "srt")
    assert "00:00:00,000 --> 00:00:02,500" in body
    assert "00:01:00,000 --> 01:02:03,457" in body  # 59.9996 s rounds up to a whole minute


def test_vtt_parses_back_with_the_same_cues() -> None:
    body = render(make_transcript(), "vtt")
    assert body.startswith("WEBVTT\n\n")
    assert "00:01:00.000 --> 01:02:03.457" in body
    captions = webvtt.from_string(body).captions
    assert [(c.start, c.end) for c in captions] == [
        ("00:00:00.000", "00:00:02.500"),
        ("00:01:00.000", "01:02:03.457"),
    ]
    assert [html.unescape(c.text) for c in captions] == [
        "[SPEAKER_00] And so, my fellow Americans,",
        "[SPEAKER_01] ask not <what> & -> what\tyou can do.",
    ]


def test_subtitles_without_diarization_have_no_speaker_prefix() -> None:
    plain = make_transcript(diarized=False)
    assert list(srt.parse(render(plain, "srt")))[0].content == "And so, my fellow Americans,"
    assert webvtt.from_string(render(plain, "vtt")).captions[0].text == "And so, my fellow Americans,"


def test_an_empty_transcript_is_a_valid_empty_document() -> None:
    assert list(srt.parse(render(EMPTY, "srt"))) == []
    assert webvtt.from_string(render(EMPTY, "vtt")).captions == []
    assert render(EMPTY, "tsv") == "start\tend\ttext\n"
    assert render(EMPTY, "rttm") == ""
    assert json.loads(render(EMPTY, "diarized_json"))["segments"] == []
    assert json.loads(render(EMPTY, "verbose_json"))["segments"] == []


def test_verbose_json_has_openais_keys_and_validates_with_its_model() -> None:
    body = json.loads(render(make_transcript(diarized=False), "verbose_json"))
    TranscriptionVerbose.model_validate(body)
    # what the API returns: OpenAI's model fields (less usage) plus "task"
    assert set(body) == (set(TranscriptionVerbose.model_fields) - {"usage"}) | {"task"}
    assert all(set(s) == set(TranscriptionSegment.model_fields) for s in body["segments"])
    assert all(set(w) == set(TranscriptionWord.model_fields) for w in body["words"])
    assert body["language"] == "english" and body["task"] == "transcribe"
    assert body["duration"] == 3724.0
    assert body["segments"][0]["text"] == " And so, my fellow Americans,"  # as Whisper wrote it
    assert body["segments"][0]["tokens"] == [50364, 400]
    assert [w["word"] for w in body["words"]] == ["And", "so,", "Americans,"]


def test_verbose_json_adds_speakers_only_when_diarized_and_words_only_when_timed() -> None:
    diarized = json.loads(render(make_transcript(), "verbose_json"))
    assert [s.get("speaker") for s in diarized["segments"]] == ["SPEAKER_00", None, "SPEAKER_01"]
    assert {w["speaker"] for w in diarized["words"]} == {"SPEAKER_00"}
    untimed = json.loads(render(make_transcript(diarized=False, words=False), "verbose_json"))
    assert "words" not in untimed
    assert all("speaker" not in s for s in untimed["segments"])


def test_diarized_json_is_openais_diarized_shape() -> None:
    body = json.loads(render(make_transcript(), "diarized_json"))
    TranscriptionDiarized.model_validate(body)
    assert set(body) == {"task", "duration", "text", "segments"}
    assert all(set(s) == set(TranscriptionDiarizedSegment.model_fields) for s in body["segments"])
    assert [(s["type"], s["speaker"], s["text"]) for s in body["segments"]] == [
        ("transcript.text.segment", "SPEAKER_00", "And so, my fellow Americans,"),
        ("transcript.text.segment", "SPEAKER_01", "ask not <what> & -->\nwhat\tyou can do."),
    ]
    assert len({s["id"] for s in body["segments"]}) == 2


def test_tsv_is_whispers_integer_milliseconds() -> None:
    rows = render(make_transcript(diarized=False), "tsv").splitlines()
    assert rows[0] == "start\tend\ttext"
    assert rows[1] == "0\t2500\tAnd so, my fellow Americans,"
    assert rows[3] == "60000\t3723457\task not <what> & --> what you can do."
    diarized = render(make_transcript(), "tsv").splitlines()
    assert diarized[0] == "start\tend\tspeaker\ttext"
    assert diarized[1].split("\t")[2] == "SPEAKER_00"


def test_rttm_has_one_speaker_line_per_turn() -> None:
    lines = render(make_transcript(), "rttm", file_id="board meeting").splitlines()
    assert [line.split() for line in lines] == [
        ["SPEAKER", "board_meeting", "1", "0.000", "2.600", "<NA>", "<NA>", "SPEAKER_00", "<NA>", "<NA>"],
        ["SPEAKER", "board_meeting", "1", "59.500", "3664.000", "<NA>", "<NA>", "SPEAKER_01", "<NA>", "<NA>"],
    ]
    assert render(make_transcript(), "rttm").split()[1] == "audio"


@pytest.mark.parametrize("fmt", ["rttm", "diarized_json"])
def test_speaker_formats_need_diarization(fmt: str) -> None:
    with pytest.raises(InvalidOptionError, match="diarization") as caught:
        render(make_transcript(diarized=False), fmt)
    assert caught.value.param == "response_format"


def test_an_unknown_format_names_the_valid_ones() -> None:
    for call in (lambda: render(make_transcript(), "docx"), lambda: media_type("docx")):
        with pytest.raises(InvalidOptionError) as caught:
            call()
        assert caught.value.param == "response_format"
        assert all(name in str(caught.value) for name in FORMATS)


def test_every_format_renders_and_has_a_media_type() -> None:
    for fmt in FORMATS:
        assert isinstance(render(make_transcript(), fmt), str)
    assert media_type("json") == media_type("verbose_json") == "application/json"
    assert media_type("vtt").startswith("text/vtt")
    assert media_type("text").startswith("text/plain")


def test_language_names_are_whispers() -> None:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    assert LANGUAGE_NAMES == LANGUAGES
