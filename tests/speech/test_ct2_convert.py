"""A packaged CTranslate2 Whisper converts exactly into a transformers model that loads offline.

Real weights, real speech: the converted tiny.en must decode the same greedy tokens as
CTranslate2 itself on the same directory, and the multilingual base must transcribe English.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from speech.ct2_convert import CT2FormatError, convert_ct2_to_transformers, read_ct2_variables
from speech.model_store import ct2_source_dir

ENCODER_ATOL = 1e-3
"""Max abs difference allowed between our encoder output and CTranslate2's (fp32 both).
Measured 2.6e-5 on tiny.en (values up to ~12); the margin covers other BLAS builds."""

CLIPS = ["jfk/jfk.flac", "lhotse_fixtures/2412-153948-0000.flac"]


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _features(processor, speech_data_dir: Path, clip: str):
    from faster_whisper import decode_audio

    audio = decode_audio(str(speech_data_dir / clip), sampling_rate=16000)
    return processor(audio, sampling_rate=16000, return_tensors="pt").input_features


@pytest.fixture(scope="module")
def tiny_en(tiny_en_model_dir: Path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_en_model_dir).eval()
    return model, WhisperProcessor.from_pretrained(tiny_en_model_dir)


@pytest.fixture(scope="module")
def tiny_en_ct2():
    import ctranslate2

    return ctranslate2.models.Whisper(str(ct2_source_dir("tiny.en")), device="cpu", compute_type="float32")


def test_a_file_that_is_not_a_ct2_model_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.bin"
    name = b"OtherSpec\0"
    bogus.write_bytes(struct.pack("<IH", 6, len(name)) + name + b"\0" * 16)
    with pytest.raises(CT2FormatError, match="WhisperSpec"):
        read_ct2_variables(bogus)
    with pytest.raises(CT2FormatError, match="not a CTranslate2 model directory"):
        convert_ct2_to_transformers(tmp_path, tmp_path / "out")


def test_a_truncated_model_is_refused(tmp_path: Path) -> None:
    # What a split model gives when only its first part is read.
    with open(ct2_source_dir("tiny.en") / "model.bin", "rb") as f:
        (tmp_path / "model.bin").write_bytes(f.read(1 << 20))
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2_variables(tmp_path / "model.bin")


def test_english_only_model_has_english_special_tokens(tiny_en) -> None:
    model, processor = tiny_en
    tok, gen = processor.tokenizer, model.generation_config
    assert model.config.vocab_size == 51864
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 50256 == gen.eos_token_id
    assert tok.convert_tokens_to_ids("<|startoftranscript|>") == 50257 == gen.decoder_start_token_id
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == 50362 == gen.no_timestamps_token_id
    assert tok.convert_ids_to_tokens([50363, 51863]) == ["<|0.00|>", "<|30.00|>"]
    assert gen.is_multilingual is False
    assert gen.alignment_heads and gen.suppress_tokens and gen.begin_suppress_tokens == [220, 50256]
    assert processor.feature_extractor.feature_size == model.config.num_mel_bins == 80


def test_multilingual_model_has_multilingual_special_tokens(base_model_dir: Path) -> None:
    from transformers import GenerationConfig, WhisperConfig, WhisperTokenizer

    config = WhisperConfig.from_pretrained(base_model_dir)
    gen = GenerationConfig.from_pretrained(base_model_dir)
    tok = WhisperTokenizer.from_pretrained(base_model_dir)
    assert config.vocab_size == 51865 and (config.d_model, config.encoder_layers) == (512, 6)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 50257 == gen.eos_token_id
    assert tok.convert_tokens_to_ids("<|startoftranscript|>") == 50258 == gen.decoder_start_token_id
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == 50363 == gen.no_timestamps_token_id
    assert gen.is_multilingual is True
    assert gen.lang_to_id["<|en|>"] == 50259 and len(gen.lang_to_id) == 99
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}


@pytest.mark.parametrize("clip", CLIPS)
def test_greedy_tokens_equal_ctranslate2(tiny_en, tiny_en_ct2, speech_data_dir: Path, clip: str) -> None:
    import ctranslate2
    import torch

    model, processor = tiny_en
    features = _features(processor, speech_data_dir, clip)
    with torch.inference_mode():
        ours = model.generate(features)[0].tolist()
    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    result = tiny_en_ct2.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt], beam_size=1)
    theirs = result[0].sequences_ids[0]
    ours = [t for t in ours if t < processor.tokenizer.eos_token_id]  # text tokens only
    assert ours == theirs, processor.tokenizer.decode(ours)
    reference = (speech_data_dir / clip).with_suffix(".txt").read_text()
    assert _words(processor.tokenizer.decode(ours)) == _words(reference)


def test_encoder_output_matches_ctranslate2(tiny_en, tiny_en_ct2, speech_data_dir: Path) -> None:
    import ctranslate2
    import torch

    model, processor = tiny_en
    features = _features(processor, speech_data_dir, CLIPS[0])
    with torch.inference_mode():
        ours = model.model.encoder(features).last_hidden_state.numpy()
    theirs = np.array(tiny_en_ct2.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True))
    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert np.abs(ours - theirs).max() < ENCODER_ATOL


def test_generation_config_gives_segment_and_word_timestamps(tiny_en, speech_data_dir: Path) -> None:
    import torch

    from faster_whisper import decode_audio

    model, processor = tiny_en
    audio = decode_audio(str(speech_data_dir / CLIPS[0]), sampling_rate=16000)
    inputs = processor(audio, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    with torch.inference_mode():
        out = model.generate(
            inputs.input_features,
            attention_mask=inputs.attention_mask,  # bounds word times by the real audio length
            return_timestamps=True,
            return_token_timestamps=True,
        )
    decoded = processor.tokenizer.decode(out["sequences"][0], output_offsets=True)
    spans = [o["timestamp"] for o in decoded["offsets"]]
    assert spans and spans[0][0] == 0.0 and 10.0 <= spans[-1][1] <= 11.0
    assert all(a <= b for a, b in spans)
    times = out["token_timestamps"][0].tolist()
    assert times == sorted(times) and 0.0 <= times[0] and times[-1] <= 11.0


def test_multilingual_base_transcribes_english(base_model_dir: Path, speech_data_dir: Path) -> None:
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(base_model_dir).eval()
    processor = WhisperProcessor.from_pretrained(base_model_dir)
    features = _features(processor, speech_data_dir, CLIPS[0])
    with torch.inference_mode():
        out = model.generate(features, language="en", task="transcribe")
    text = processor.batch_decode(out, skip_special_tokens=True)[0]
    assert _words(text) == _words((speech_data_dir / "jfk/jfk.txt").read_text()), text
