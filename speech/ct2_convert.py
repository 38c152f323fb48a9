"""Convert a CTranslate2 Whisper model (the faster-whisper format) into a transformers directory.

Registry packages carry Whisper only in CTranslate2 format and the build machines cannot reach the
model hub, so the offline default is converted here, once, with numpy alone: no ctranslate2 import,
so the service image does not need it. The mapping is exact (MODELS.md): converted weights give the
same greedy tokens as CTranslate2 on the same audio.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    # 5 is bfloat16: numpy has no such type, handled in _read_array.
}
_BF16 = 5


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper model this reader understands."""


def _read_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<H", f.read(2))
    raw = f.read(length)
    return raw.rstrip(b"\0").decode("utf-8")


def _read_array(f: BinaryIO) -> np.ndarray:
    (rank,) = struct.unpack("<B", f.read(1))
    shape = struct.unpack(f"<{rank}I", f.read(4 * rank)) if rank else ()
    dtype_id, nbytes = struct.unpack("<BI", f.read(5))
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise CT2FormatError("model.bin is truncated")
    if dtype_id == _BF16:
        # bfloat16 is the top half of a float32.
        as_u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return as_u16.view(np.float32).reshape(shape)
    if dtype_id not in _DTYPES:
        raise CT2FormatError(f"unsupported variable dtype id {dtype_id}")
    return np.frombuffer(raw, dtype=_DTYPES[dtype_id]).reshape(shape)


def read_ct2_variables(model_bin: Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 `model.bin`, aliases resolved, as numpy arrays."""
    try:
        variables = _read_ct2_file(model_bin)
    except (struct.error, UnicodeDecodeError) as e:
        raise CT2FormatError(f"{model_bin} is truncated or not a CTranslate2 model: {e}") from e
    if any(name.endswith("weight_scale") for name in variables):
        raise CT2FormatError(f"{model_bin} is quantized (int8); only float models convert exactly")
    return variables


def _read_ct2_file(model_bin: Path) -> dict[str, np.ndarray]:
    with open(model_bin, "rb") as f:
        (binary_version,) = struct.unpack("<I", f.read(4))
        if binary_version < 5:
            raise CT2FormatError(f"binary version {binary_version} is too old (need >= 5)")
        spec_name = _read_string(f)
        if spec_name != "WhisperSpec":
            raise CT2FormatError(f"expected a WhisperSpec model, got {spec_name!r}")
        _revision, n_vars = struct.unpack("<II", f.read(8))
        variables: dict[str, np.ndarray] = {}
        for _ in range(n_vars):
            name = _read_string(f)
            variables[name] = _read_array(f)
        (n_aliases,) = struct.unpack("<I", f.read(4))
        for _ in range(n_aliases):
            alias = _read_string(f)
            target = _read_string(f)
            variables[alias] = variables[target]
    return variables


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    if n == 0:
        raise CT2FormatError(f"no {stack} layers in the model")
    return n


def _f32(a: np.ndarray) -> np.ndarray:
    """fp32, contiguous and owning its memory (the reader's arrays view a read-only buffer)."""
    return np.ascontiguousarray(a, dtype=np.float32).copy()


def _linear(out: dict, v: dict, src: str, dst: str, bias: bool = True) -> None:
    out[f"{dst}.weight"] = _f32(v[f"{src}/weight"])
    if bias:
        out[f"{dst}.bias"] = _f32(v[f"{src}/bias"])


def _norm(out: dict, v: dict, src: str, dst: str) -> None:
    out[f"{dst}.weight"] = _f32(v[f"{src}/gamma"])
    out[f"{dst}.bias"] = _f32(v[f"{src}/beta"])


def _fused_qkv(out: dict, v: dict, src: str, dst: str) -> None:
    w = np.split(v[f"{src}/weight"], 3, axis=0)
    b = np.split(v[f"{src}/bias"], 3, axis=0)
    for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w, b):
        out[f"{dst}.{name}.weight"] = _f32(wi)
        if name != "k_proj":  # transformers' k_proj has no bias; CTranslate2 stores zeros.
            out[f"{dst}.{name}.bias"] = _f32(bi)


def _fused_kv(out: dict, v: dict, src: str, dst: str) -> None:
    w = np.split(v[f"{src}/weight"], 2, axis=0)
    b = np.split(v[f"{src}/bias"], 2, axis=0)
    out[f"{dst}.k_proj.weight"] = _f32(w[0])
    out[f"{dst}.v_proj.weight"] = _f32(w[1])
    out[f"{dst}.v_proj.bias"] = _f32(b[1])


def ct2_to_state_dict(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map CTranslate2 variable names onto `WhisperForConditionalGeneration` parameter names."""
    sd: dict[str, np.ndarray] = {}
    v = variables
    enc, dec = "model.encoder", "model.decoder"
    _linear(sd, v, "encoder/conv1", f"{enc}.conv1")
    _linear(sd, v, "encoder/conv2", f"{enc}.conv2")
    sd[f"{enc}.embed_positions.weight"] = _f32(v["encoder/position_encodings/encodings"])
    for i in range(_count_layers(v, "encoder")):
        s, d = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        _fused_qkv(sd, v, f"{s}/self_attention/linear_0", f"{d}.self_attn")
        _linear(sd, v, f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
        _norm(sd, v, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
        _linear(sd, v, f"{s}/ffn/linear_0", f"{d}.fc1")
        _linear(sd, v, f"{s}/ffn/linear_1", f"{d}.fc2")
        _norm(sd, v, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
    _norm(sd, v, "encoder/layer_norm", f"{enc}.layer_norm")

    sd[f"{dec}.embed_tokens.weight"] = _f32(v["decoder/embeddings/weight"])
    sd[f"{dec}.embed_positions.weight"] = _f32(v["decoder/position_encodings/encodings"])
    for i in range(_count_layers(v, "decoder")):
        s, d = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        _fused_qkv(sd, v, f"{s}/self_attention/linear_0", f"{d}.self_attn")
        _linear(sd, v, f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
        _norm(sd, v, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
        _linear(sd, v, f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj")
        _fused_kv(sd, v, f"{s}/attention/linear_1", f"{d}.encoder_attn")
        _linear(sd, v, f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj")
        _norm(sd, v, f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm")
        _linear(sd, v, f"{s}/ffn/linear_0", f"{d}.fc1")
        _linear(sd, v, f"{s}/ffn/linear_1", f"{d}.fc2")
        _norm(sd, v, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
    _norm(sd, v, "decoder/layer_norm", f"{dec}.layer_norm")
    # proj_out is tied to embed_tokens (tie_word_embeddings) and not stored.
    return sd


def _scalar(variables: dict[str, np.ndarray], name: str) -> int:
    return int(np.asarray(variables[name]).reshape(-1)[0])


class SpecialTokens:
    """Ids of Whisper's special tokens, read from the tokenizer (they differ by one between the
    English-only vocabulary, <|endoftext|> = 50256, and the multilingual one, 50257)."""

    def __init__(self, added: dict[str, int]) -> None:
        def need(content: str) -> int:
            if content not in added:
                raise CT2FormatError(f"tokenizer.json has no {content} token")
            return added[content]

        self.eot = need("<|endoftext|>")
        self.sot = need("<|startoftranscript|>")
        self.translate = need("<|translate|>")
        self.transcribe = need("<|transcribe|>")
        self.sot_lm = need("<|startoflm|>")
        self.sot_prev = need("<|startofprev|>")
        self.no_speech = added.get("<|nospeech|>", added.get("<|nocaptions|>"))
        self.no_timestamps = need("<|notimestamps|>")
        self.timestamp_begin = self.no_timestamps + 1
        # Languages sit between <|startoftranscript|> and <|translate|>, in Whisper's order.
        by_id = {i: c for c, i in added.items()}
        self.languages = {by_id[i]: i for i in range(self.sot + 1, self.translate) if i in by_id}


def _added_tokens(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    return {t["content"]: int(t["id"]) for t in tokenizer_json.get("added_tokens", [])}


def _timestamp_tokens(first_id: int) -> list[dict[str, Any]]:
    """<|0.00|> ... <|30.00|>: some CTranslate2 tokenizers (tiny.en) lack them; transformers'
    own Whisper tokenizers carry them as added tokens, and `convert_ids_to_tokens` needs them."""
    return [
        {
            "id": first_id + i,
            "content": f"<|{i * 0.02:.2f}|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": True,
            "special": False,
        }
        for i in range(1501)
    ]


def _complete_tokenizer(tokenizer_json: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The CTranslate2 tokenizer.json, with timestamp tokens added when it lacks them."""
    tok = json.loads(json.dumps(tokenizer_json))
    added = _added_tokens(tok)
    special = SpecialTokens(added)
    if "<|0.00|>" not in added:
        tok["added_tokens"] = list(tok["added_tokens"]) + _timestamp_tokens(special.timestamp_begin)
    n_ids = 1 + max(int(t["id"]) for t in tok["added_tokens"])
    if n_ids != vocab_size:
        raise CT2FormatError(f"tokenizer has {n_ids} ids but the embedding has {vocab_size} rows")
    return tok


def _model_config(v: dict[str, np.ndarray], special: SpecialTokens, ct2_cfg: dict) -> dict:
    d_model = int(v["encoder/conv1/weight"].shape[0])
    vocab_size = int(v["decoder/embeddings/weight"].shape[0])
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "activation_function": "gelu",
        "d_model": d_model,
        "num_mel_bins": int(v["encoder/conv1/weight"].shape[1]),
        "encoder_layers": _count_layers(v, "encoder"),
        "decoder_layers": _count_layers(v, "decoder"),
        "num_hidden_layers": _count_layers(v, "encoder"),
        "encoder_attention_heads": _scalar(v, "encoder/num_heads"),
        "decoder_attention_heads": _scalar(v, "decoder/num_heads"),
        "encoder_ffn_dim": int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]),
        "vocab_size": vocab_size,
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "use_cache": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "init_std": 0.02,
        "median_filter_width": 7,
        "bos_token_id": special.eot,
        "eos_token_id": special.eot,
        "pad_token_id": special.eot,
        "decoder_start_token_id": special.sot,
        "suppress_tokens": list(ct2_cfg.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_cfg.get("suppress_ids_begin", [220, special.eot])),
        "dtype": "float32",
    }


def _generation_config(special: SpecialTokens, ct2_cfg: dict, n_positions: int) -> dict:
    """What transformers' Whisper `generate` reads for language/task prompts, timestamps
    (no_timestamps_token_id, max_initial_timestamp_index) and word timestamps (alignment_heads)."""
    # The English-only vocabulary is GPT-2's (50256 text tokens); the multilingual one has 50257.
    multilingual = special.eot != 50256
    gen: dict[str, Any] = {
        "alignment_heads": [list(map(int, h)) for h in ct2_cfg.get("alignment_heads", [])],
        "begin_suppress_tokens": list(ct2_cfg.get("suppress_ids_begin", [220, special.eot])),
        "suppress_tokens": list(ct2_cfg.get("suppress_ids", [])),
        "bos_token_id": special.eot,
        "eos_token_id": special.eot,
        "pad_token_id": special.eot,
        "decoder_start_token_id": special.sot,
        "no_timestamps_token_id": special.no_timestamps,
        "prev_sot_token_id": special.sot_prev,
        "is_multilingual": multilingual,
        "max_initial_timestamp_index": 50,
        "max_length": n_positions,
        "return_timestamps": False,
    }
    if multilingual:
        gen["lang_to_id"] = dict(special.languages)
        gen["task_to_id"] = {"transcribe": special.transcribe, "translate": special.translate}
    return gen


def _tokenizer_config(special: SpecialTokens, added: dict[str, int], n_positions: int) -> dict:
    # Every id up to <|notimestamps|> is special: transformers' Whisper tokenizer takes
    # `all_special_ids[-1] + 1` as the first timestamp token when decoding with offsets.
    extra = [c for c, i in sorted(added.items(), key=lambda kv: kv[1]) if i <= special.no_timestamps]
    eot = "<|endoftext|>"
    return {
        "tokenizer_class": "WhisperTokenizer",
        "backend": "tokenizers",
        "add_prefix_space": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": eot,
        "extra_special_tokens": extra,
        "model_max_length": n_positions,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "processor_class": "WhisperProcessor",
    }


def _preprocessor_config(n_mels: int) -> dict:
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": n_mels,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "chunk_length": 30,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _save_safetensors(state_dict: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(state_dict, str(path), metadata={"format": "pt"})


OUTPUT_FILES = (
    # What a converted directory holds; model_store checks them before trusting a cache entry.
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
)


def convert_ct2_to_transformers(ct2_dir: Path, out_dir: Path) -> None:
    """Write a directory that `WhisperForConditionalGeneration.from_pretrained` and
    `WhisperProcessor.from_pretrained` load offline, from a CTranslate2 Whisper directory
    (model.bin, config.json, tokenizer.json). Weights are stored as fp32.

    `out_dir` is created if needed; publishing it atomically is the caller's job
    (see speech.model_store).
    """
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (ct2_dir / name).is_file():
            raise CT2FormatError(f"{ct2_dir} is not a CTranslate2 model directory: no {name}")
    ct2_cfg = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    variables = read_ct2_variables(ct2_dir / "model.bin")
    vocab_size = int(variables["decoder/embeddings/weight"].shape[0])
    n_positions = int(variables["decoder/position_encodings/encodings"].shape[0])
    n_mels = int(variables["encoder/conv1/weight"].shape[1])

    tokenizer = _complete_tokenizer(
        json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8")), vocab_size
    )
    added = _added_tokens(tokenizer)
    special = SpecialTokens(added)

    model_config = _model_config(variables, special, ct2_cfg)

    out_dir.mkdir(parents=True, exist_ok=True)
    _save_safetensors(ct2_to_state_dict(variables), out_dir / "model.safetensors")
    _write_json(out_dir / "config.json", model_config)
    _write_json(out_dir / "generation_config.json", _generation_config(special, ct2_cfg, n_positions))
    _write_json(out_dir / "tokenizer.json", tokenizer)
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(special, added, n_positions))
    _write_json(out_dir / "preprocessor_config.json", _preprocessor_config(n_mels))
