"""Engine errors survive the trip between processes (Ray replicas pickle them)."""

from __future__ import annotations

import pickle

import pytest

from speech.errors import CorruptAudioError, InvalidOptionError


def test_invalid_option_keeps_its_parameter_through_pickling():
    err = pickle.loads(pickle.dumps(InvalidOptionError("language", "language 'xx' is not supported")))
    assert isinstance(err, InvalidOptionError)
    assert err.param == "language" and str(err) == "language 'xx' is not supported"
    assert err.code == "invalid_option"


@pytest.mark.parametrize("error", [CorruptAudioError("truncated FLAC")])
def test_audio_errors_keep_their_code_through_pickling(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and back.code == error.code and str(back) == str(error)
