"""OpenAI request parameters: what is accepted, and which `param` a bad value is blamed on."""

from __future__ import annotations

import pytest

from serve.params import check_model, parse_params
from speech.errors import InvalidOptionError


def parse(**fields: object):  # noqa: ANN201
    return parse_params(task="transcribe", **{"model": "whisper-1", **fields})  # type: ignore[arg-type]


def test_defaults_are_openais() -> None:
    p = parse()
    assert (p.response_format, p.request.options.temperature, p.timestamp_granularities,
            p.request.diarize) == ("json", 0.0, (), False)
    assert p.request.options.word_timestamps is False and p.request.options.task == "transcribe"


def test_word_granularity_turns_on_word_timestamps() -> None:
    p = parse(response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert p.timestamp_granularities == ("word", "segment")
    assert p.request.options.word_timestamps is True


def test_language_and_prompt_reach_the_engine_options() -> None:
    o = parse(language="EN", prompt="Kennedy", temperature="0.2").request.options
    assert (o.language, o.initial_prompt, o.temperature) == ("en", "Kennedy", 0.2)


def test_diarized_json_implies_diarize_and_takes_speaker_hints() -> None:
    p = parse(response_format="diarized_json", min_speakers="1", max_speakers="3")
    assert p.request.diarize and (p.request.speakers.min_speakers, p.request.speakers.max_speakers) == (1, 3)


@pytest.mark.parametrize(("fields", "param"), [
    ({"model": ""}, "model"),
    ({"response_format": "docx"}, "response_format"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": "1.5"}, "temperature"),
    ({"timestamp_granularities": ["char"], "response_format": "verbose_json"},
     "timestamp_granularities"),
    ({"timestamp_granularities": ["word"], "response_format": "json"}, "timestamp_granularities"),
    ({"stream": "true", "response_format": "srt"}, "stream"),  # srt cannot stream
    ({"language": "english!"}, "language"),
    ({"diarize": "maybe"}, "diarize"),
    ({"num_speakers": "2"}, "num_speakers"),  # without diarize
    ({"diarize": "true", "num_speakers": "0"}, "num_speakers"),
    ({"diarize": "true", "num_speakers": "two"}, "num_speakers"),
    ({"diarize": "true", "num_speakers": "2", "max_speakers": "3"}, "num_speakers"),
    ({"diarize": "true", "min_speakers": "4", "max_speakers": "2"}, "min_speakers"),
])
def test_bad_values_name_their_parameter(fields: dict, param: str) -> None:
    with pytest.raises(InvalidOptionError) as info:
        parse(**fields)
    assert info.value.param == param


def test_only_the_loaded_model_or_whisper_1_is_served() -> None:
    check_model("whisper-1", "tiny.en")
    check_model("tiny.en", "tiny.en")
    with pytest.raises(InvalidOptionError) as info:
        check_model("gpt-4o-transcribe", "tiny.en")
    assert info.value.param == "model"
