"""The bulk pipeline refuses what its model cannot do before Ray starts or any input is listed."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipelines import batch_transcribe
from pipelines.batch_transcribe import RunConfig, UsageError, run


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_transcribe, "list_inputs", lambda *_: pytest.fail("inputs were listed"))
    monkeypatch.setattr(batch_transcribe, "_connect", lambda *_a, **_k: pytest.fail("Ray was started"))


@pytest.mark.parametrize(("options", "param"), [({"language": "fr"}, "'fr'"), ({"task": "translate"}, "translate")])
def test_an_english_only_model_asked_for_another_language_is_a_usage_error(
        tmp_path: Path, speech_data_dir: Path, no_work: None, options: dict, param: str) -> None:
    output = tmp_path / "out.jsonl"
    cfg = RunConfig(inputs=[str(speech_data_dir / "fleurs_multilingual")], output=str(output), model="tiny.en",
                    **options)
    with pytest.raises(UsageError, match=param) as err:
        run(cfg, out=io.StringIO())
    assert "tiny.en" in str(err.value)
    assert not output.exists()


def test_a_multilingual_model_passes_the_precheck_for_french() -> None:
    request = RunConfig(inputs=[], output="o.jsonl", model="base", language="fr", task="translate").request()
    batch_transcribe._precheck(RunConfig(inputs=[]), request, model="base")  # no error


def test_an_unknown_model_is_a_usage_error(tmp_path: Path, no_work: None) -> None:
    cfg = RunConfig(inputs=[str(tmp_path)], output=str(tmp_path / "o.jsonl"), model="no-such-model")
    with pytest.raises(UsageError, match="no-such-model"):
        run(cfg, out=io.StringIO())
