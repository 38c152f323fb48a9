"""A Transcript rendered in the response formats clients ask for.

Shapes follow OpenAI's transcription API (json, text, srt, verbose_json, vtt, diarized_json)
so that OpenAI clients parse our answers unchanged; tsv follows openai-whisper's writer and
rttm the NIST format that diarization tools score against.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from speech.errors import InvalidOptionError
from speech.languages import language_name
from speech.types import Segment, Transcript

FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json", "tsv", "rttm")

_MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "diarized_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "tsv": "text/tab-separated-values; charset=utf-8",
    "rttm": "text/plain; charset=utf-8",
}

def render(transcript: Transcript, fmt: str, *, file_id: str = "audio") -> str:
    """`transcript` as the body of a response in format `fmt` (one of FORMATS); `file_id`
    names the recording in rttm lines."""
    renderer = _RENDERERS.get(fmt)
    if renderer is None:
        raise InvalidOptionError(
            "response_format", f"unknown response_format {fmt!r}; use one of {', '.join(FORMATS)}"
        )
    return renderer(transcript, file_id)


def media_type(fmt: str) -> str:
    """The Content-Type of a response rendered in `fmt`."""
    if fmt not in _MEDIA_TYPES:
        raise InvalidOptionError(
            "response_format", f"unknown response_format {fmt!r}; use one of {', '.join(FORMATS)}"
        )
    return _MEDIA_TYPES[fmt]


def _json(t: Transcript, _file_id: str) -> str:
    return _dumps({"text": t.text})


def _text(t: Transcript, _file_id: str) -> str:
    return t.text + "\n" if t.text else ""


def _verbose_json(t: Transcript, _file_id: str) -> str:
    body: dict[str, Any] = {
        "task": t.task,
        "language": language_name(t.language),
        "duration": t.duration,
        "text": t.text,
        "segments": [_verbose_segment(s) for s in t.segments],
    }
    if t.language_probs is not None:  # extension: how sure the detection was
        body["language_probs"] = t.language_probs
    words = t.words
    if words:
        body["words"] = [
            {"word": w.word.strip(), "start": w.start, "end": w.end}
            | ({"speaker": w.speaker} if w.speaker is not None else {})
            for w in words
        ]
    return _dumps(body)


def _verbose_segment(s: Segment) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": s.id,
        "seek": s.seek,
        "start": s.start,
        "end": s.end,
        "text": s.text,
        "tokens": list(s.tokens),
        "temperature": s.temperature,
        "avg_logprob": s.avg_logprob,
        "compression_ratio": s.compression_ratio,
        "no_speech_prob": s.no_speech_prob,
    }
    if s.speaker is not None:
        out["speaker"] = s.speaker
    return out


def _diarized_json(t: Transcript, _file_id: str) -> str:
    _require_speakers(t, "diarized_json")
    segments = [
        {
            "type": "transcript.text.segment",
            "id": f"seg_{i}",
            "start": s.start,
            "end": s.end,
            "text": s.text.strip(),
            "speaker": s.speaker or "UNKNOWN",
        }
        for i, s in enumerate(_spoken(t))
    ]
    return _dumps({"task": t.task, "duration": t.duration, "text": t.text, "segments": segments})


def _srt(t: Transcript, _file_id: str) -> str:
    cues = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{_cue_text(s)}\n"
        for i, s in enumerate(_spoken(t), start=1)
    ]
    return "\n".join(cues)


def _vtt(t: Transcript, _file_id: str) -> str:
    cues = [
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{_vtt_escape(_cue_text(s))}\n"
        for s in _spoken(t)
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def _tsv(t: Transcript, _file_id: str) -> str:
    """openai-whisper's tsv (integer milliseconds), plus a speaker column when diarized."""
    diarized = any(s.speaker is not None for s in t.segments)
    header = "start\tend\tspeaker\ttext" if diarized else "start\tend\ttext"
    rows = [header]
    for s in t.segments:
        cols = [str(round(1000 * s.start)), str(round(1000 * s.end))]
        if diarized:
            cols.append(s.speaker or "")
        cols.append(_one_line(s.text).replace("\t", " "))
        rows.append("\t".join(cols))
    return "\n".join(rows) + "\n"


def _rttm(t: Transcript, file_id: str) -> str:
    """NIST RTTM, one SPEAKER line per diarization turn (as pyannote writes it)."""
    _require_speakers(t, "rttm")
    uri = _token(file_id) or "audio"
    return "".join(
        f"SPEAKER {uri} 1 {turn.start:.3f} {max(turn.end - turn.start, 0.0):.3f} "
        f"<NA> <NA> {_token(turn.speaker)} <NA> <NA>\n"
        for turn in t.speakers or []
    )


def _require_speakers(t: Transcript, fmt: str) -> None:
    if t.speakers is None:
        raise InvalidOptionError(
            "response_format",
            f"response_format {fmt!r} needs speaker diarization, which was not run for this "
            "transcription; ask for diarization or use another format",
        )


def _spoken(t: Transcript) -> list[Segment]:
    """Segments that carry text: a cue or a diarized segment without words is noise."""
    return [s for s in t.segments if s.text.strip()]


def _clock(seconds: float, decimal_marker: str) -> str:
    """HH:MM:SS,mmm (srt) or HH:MM:SS.mmm (vtt); rounding whole milliseconds first so that
    59.9996 s becomes 00:01:00,000 and never 00:00:60,000."""
    ms = max(round(seconds * 1000), 0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _cue_text(s: Segment) -> str:
    text = _one_line(s.text).replace("-->", "->")
    return f"[{s.speaker}] {text}" if s.speaker is not None else text


def _one_line(text: str) -> str:
    """A cue or row on one line: a blank line would end an srt/vtt cue early."""
    return re.sub(r"\s*\n\s*", " ", text.strip())


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _token(text: str) -> str:
    """A whitespace-free field, as RTTM's space-separated columns need."""
    return re.sub(r"\s+", "_", text.strip())


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False)


_RENDERERS: dict[str, Callable[[Transcript, str], str]] = {
    "json": _json,
    "text": _text,
    "srt": _srt,
    "verbose_json": _verbose_json,
    "vtt": _vtt,
    "diarized_json": _diarized_json,
    "tsv": _tsv,
    "rttm": _rttm,
}
assert set(_RENDERERS) == set(FORMATS) == set(_MEDIA_TYPES)
