"""Speakers onto words and segments: hand-built cases with known answers."""

from __future__ import annotations

import copy

from speech.speaker_merge import assign_speakers, relabel_by_first_appearance
from speech.types import Segment, SpeakerTurn, Transcript, Word


def _transcript(*segments: list[tuple[float, float, str]]) -> Transcript:
    built = []
    for i, words in enumerate(segments):
        ws = [Word(start=s, end=e, word=f" {w}") for s, e, w in words]
        built.append(Segment(id=i, start=ws[0].start, end=ws[-1].end, text="".join(w.word for w in ws), words=ws))
    return Transcript(language="en", duration=10.0, segments=built)


def _speakers(transcript: Transcript) -> list[str | None]:
    return [w.speaker for w in transcript.words]


def test_a_word_across_a_boundary_goes_to_the_turn_covering_more_of_it() -> None:
    turns = [SpeakerTurn(0.0, 1.0, "A"), SpeakerTurn(1.0, 2.0, "B")]
    out = assign_speakers(_transcript([(0.1, 0.5, "hi"), (0.8, 1.5, "there")]), turns)
    assert _speakers(out) == ["SPEAKER_00", "SPEAKER_01"]


def test_a_word_in_a_gap_goes_to_the_nearest_turn() -> None:
    turns = [SpeakerTurn(0.0, 1.0, "A"), SpeakerTurn(3.0, 4.0, "B")]
    out = assign_speakers(_transcript([(1.2, 1.5, "early"), (2.6, 2.8, "late")]), turns)
    assert _speakers(out) == ["SPEAKER_00", "SPEAKER_01"]


def test_overlapping_turns_give_the_word_to_the_larger_overlap() -> None:
    turns = [SpeakerTurn(0.0, 2.5, "A"), SpeakerTurn(2.0, 4.0, "B")]
    out = assign_speakers(_transcript([(0.5, 1.0, "one"), (2.1, 2.9, "two"), (2.2, 2.45, "three")]), turns)
    # "two": A covers 0.4 s, B 0.8 s; "three" lies inside both: the tie goes to the first speaker
    assert _speakers(out) == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_00"]


def test_a_segment_is_split_where_the_speaker_changes() -> None:
    turns = [SpeakerTurn(0.0, 1.9, "A"), SpeakerTurn(1.9, 4.0, "B")]
    transcript = _transcript(
        [(0.0, 0.5, "how"), (0.5, 1.0, "are"), (1.0, 1.8, "you"), (2.0, 2.5, "fine"), (2.5, 3.0, "thanks")],
        [(3.2, 3.6, "bye")],
    )
    out = assign_speakers(transcript, turns)
    assert [(s.id, s.speaker, s.text) for s in out.segments] == [
        (0, "SPEAKER_00", " how are you"),
        (1, "SPEAKER_01", " fine thanks"),
        (2, "SPEAKER_01", " bye"),
    ]
    assert (out.segments[0].start, out.segments[0].end) == (0.0, 1.8)
    assert (out.segments[1].start, out.segments[1].end) == (2.0, 3.0)
    assert out.text == transcript.text


def test_one_speaker_labels_everything_and_keeps_segments_whole() -> None:
    transcript = _transcript([(0.0, 0.5, "a"), (0.6, 1.0, "b")], [(1.5, 2.0, "c")])
    out = assign_speakers(transcript, [SpeakerTurn(0.2, 1.8, "SPEAKER_07")])
    assert _speakers(out) == ["SPEAKER_00"] * 3
    assert [s.speaker for s in out.segments] == ["SPEAKER_00", "SPEAKER_00"]
    assert [s.tokens for s in out.segments] == [s.tokens for s in transcript.segments]
    assert out.speakers == [SpeakerTurn(0.2, 1.8, "SPEAKER_00")]


def test_zero_speech_leaves_everything_unlabelled() -> None:
    transcript = _transcript([(0.0, 0.5, "noise")])
    out = assign_speakers(transcript, [])
    assert _speakers(out) == [None]
    assert out.segments[0].speaker is None
    assert out.speakers == []


def test_a_segment_without_words_takes_the_speaker_overlapping_it_most() -> None:
    transcript = Transcript(
        language="en",
        duration=5.0,
        segments=[Segment(id=0, start=0.0, end=2.0, text=" a"), Segment(id=1, start=2.0, end=4.0, text=" b")],
    )
    turns = [SpeakerTurn(0.0, 1.5, "X"), SpeakerTurn(1.5, 4.0, "Y")]
    out = assign_speakers(transcript, turns)
    assert [s.speaker for s in out.segments] == ["SPEAKER_00", "SPEAKER_01"]


def test_labels_are_renumbered_in_order_of_first_appearance() -> None:
    turns = [SpeakerTurn(5.0, 6.0, "SPEAKER_00"), SpeakerTurn(0.0, 1.0, "SPEAKER_03"), SpeakerTurn(2.0, 3.0, "SPEAKER_00")]
    assert relabel_by_first_appearance(turns) == [
        SpeakerTurn(0.0, 1.0, "SPEAKER_00"),
        SpeakerTurn(2.0, 3.0, "SPEAKER_01"),
        SpeakerTurn(5.0, 6.0, "SPEAKER_01"),
    ]


def test_the_input_transcript_is_not_changed() -> None:
    transcript = _transcript([(0.0, 0.5, "a"), (1.5, 2.0, "b")])
    before = copy.deepcopy(transcript)
    assign_speakers(transcript, [SpeakerTurn(0.0, 1.0, "A"), SpeakerTurn(1.0, 2.0, "B")])
    assert transcript == before
