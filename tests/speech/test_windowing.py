"""Cutting long audio into <= 30 s windows at pauses, with speech found by the VAD."""

from __future__ import annotations

import numpy as np
import pytest

from speech.types import SAMPLE_RATE
from speech.vad import EnergyVad, SileroVad, VadParams, regions_from_probabilities
from speech.windowing import plan_windows

SR = SAMPLE_RATE


@pytest.mark.parametrize("vad", [EnergyVad(), SileroVad()], ids=["energy", "silero"])
def test_vad_leaves_no_speech_of_a_real_recording_out(vad, decode, speech_data_dir):
    """ES2011a: speech at 1.46-2.82 s and 3.36-4.36 s (reference turns)."""
    audio = decode(speech_data_dir / "lhotse_fixtures" / "ES2011a.Headset-0-40s-46s.wav")
    regions = [(s / SR, e / SR) for s, e in vad.speech_regions(audio)]
    for t in [*np.arange(1.6, 2.7, 0.1), *np.arange(3.5, 4.2, 0.1)]:
        assert any(s <= t <= e for s, e in regions), (t, regions)


def test_silero_places_speech_tightly(decode, speech_data_dir):
    audio = decode(speech_data_dir / "lhotse_fixtures" / "ES2011a.Headset-0-40s-46s.wav")
    regions = [(s / SR, e / SR) for s, e in SileroVad().speech_regions(audio)]
    assert regions[0][0] == pytest.approx(1.46, abs=0.35)
    assert regions[-1][1] == pytest.approx(4.36, abs=0.35)


@pytest.mark.parametrize("vad", [EnergyVad(), SileroVad()], ids=["energy", "silero"])
def test_vad_finds_nothing_in_silence(vad):
    assert vad.speech_regions(np.zeros(10 * SR, dtype=np.float32)) == []


def test_hysteresis_merges_short_gaps_and_drops_blips():
    params = VadParams(threshold=0.5, neg_threshold=0.35, min_speech_s=0.25, min_silence_s=0.15, pad_s=0.0)
    chunk = 512  # 32 ms
    probs = np.array([0] * 10 + [1] * 20 + [0] * 2 + [1] * 20 + [0] * 30 + [1] * 3 + [0] * 10, dtype=np.float32)
    regions = regions_from_probabilities(probs, len(probs) * chunk, params)
    assert regions == [(10 * chunk, 52 * chunk)]  # 64 ms gap merged, 96 ms blip dropped


def test_windows_never_exceed_30_s_and_cut_only_in_gaps():
    audio = np.zeros(200 * SR, dtype=np.float32)
    regions = [(int(s * SR), int((s + 8) * SR)) for s in range(0, 190, 10)]  # 8 s phrases, 2 s gaps
    windows = plan_windows(audio, regions)
    assert all(e - s <= 30 * SR for s, e in windows)
    cut_points = {s for s, _ in windows} | {e for _, e in windows}
    # windows end in silence: no cut falls inside a stretch of speech
    assert not any(s < p < e for p in cut_points for s, e in regions)
    covered = sum(e - s for s, e in windows)
    assert covered >= sum(e - s for s, e in regions)


def test_speech_longer_than_a_window_is_cut_at_its_quietest_moment():
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.3, 70 * SR).astype(np.float32)
    audio[int(25 * SR) : int(25.3 * SR)] = 0.0  # a pause inside one long stretch of speech
    windows = plan_windows(audio, [(0, len(audio))])
    assert windows[0][1] / SR == pytest.approx(25.15, abs=0.2)
    assert all(e - s <= 30 * SR for s, e in windows)
    assert windows[-1][1] == len(audio)
