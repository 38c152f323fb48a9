"""Dynamic time warping over cross-attention gives each token its time."""

from __future__ import annotations

import numpy as np

from speech.alignment import dtw_path, median_filter, token_timings


def test_dtw_follows_the_cheap_diagonal():
    cost = np.ones((4, 8))
    for i in range(4):
        cost[i, 2 * i : 2 * i + 2] = 0.0
    rows, cols = dtw_path(cost)
    assert rows[0] == 0 and cols[0] == 0 and rows[-1] == 3 and cols[-1] == 7
    assert np.all(np.diff(rows) >= 0) and np.all(np.diff(cols) >= 0)
    assert cost[rows, cols].sum() <= 2.0


def test_median_filter_removes_a_spike():
    x = np.array([[0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0]])
    assert median_filter(x, 3).max() == 0.0


def test_token_timings_from_an_attention_that_walks_forward():
    n_tokens, frames = 3, 60
    rows = 1 + n_tokens + 1  # no_timestamps, three tokens, eot
    attn = np.full((2, rows, frames), 1e-3)
    # row p predicts token p+1: row 0 -> token 0 at frames 10-19, row 1 -> 20-29, row 2 -> 30-39, row 3 -> eot at 40
    for p, start in enumerate((10, 20, 30, 40)):
        attn[:, p, start : start + 10] = 1.0
    timings = token_timings(attn, n_tokens, frames)
    starts = [round(t.start, 2) for t in timings]
    assert starts[0] <= 0.2 + 1e-9 and starts == sorted(starts)
    assert timings[-1].end >= timings[-1].start
    assert all(t.end <= frames * 0.02 for t in timings)
