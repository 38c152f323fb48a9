"""The engine alone on one CUDA GPU: real-time factor by batch size, large-v3-turbo shape.

Weights are random (no network, no checkpoint needed) and every window decodes a fixed number
of tokens, so the figures measure the engine's machinery (log-mel on the GPU, fp16 SDPA encoder,
the batched decoding loop with timestamp rules) at the size that production runs, not a model's
accuracy. Needs only torch and transformers, plus a Whisper tokenizer directory (any multilingual
Whisper tokenizer: pass --tokenizer, e.g. the converted packaged `base`).

Usage: python bench/gpu_asr.py --tokenizer DIR [--batch-sizes 16,64,256] [--tokens 120]
Ends with: RESULT best_rtfx=<f> at_batch=<n>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speech.asr import WhisperEngine, Window  # noqa: E402
from speech.types import SAMPLE_RATE, TranscribeOptions  # noqa: E402

TURBO = dict(
    d_model=1280,
    encoder_layers=32,
    encoder_attention_heads=20,
    encoder_ffn_dim=5120,
    decoder_layers=4,
    decoder_attention_heads=20,
    decoder_ffn_dim=5120,
    num_mel_bins=128,
    vocab_size=51866,
    max_source_positions=1500,
    max_target_positions=448,
)


def build_engine(tokenizer_dir: Path, dtype: torch.dtype) -> WhisperEngine:
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    config = WhisperConfig(**TURBO)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = WhisperForConditionalGeneration(config)
    torch.set_default_dtype(previous)
    gen = GenerationConfig.from_pretrained(tokenizer_dir)
    gen.alignment_heads = [[2, 4], [2, 11], [3, 3], [3, 6], [3, 11], [3, 14]]
    model.generation_config = gen
    tokenizer = WhisperTokenizerFast.from_pretrained(tokenizer_dir)
    features = WhisperFeatureExtractor(feature_size=128)
    engine = WhisperEngine.from_model(model, features, tokenizer, device="cuda", vad="energy", max_batch_size=4096)
    engine._dtype = dtype
    return engine


def time_batch(engine: WhisperEngine, windows: list[Window], repeats: int) -> tuple[float, dict]:
    """Median wall time of one batched call, and a split of one call into its phases."""
    walls = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.transcribe_windows(windows)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    phases = {}
    with torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        feats = engine._features(windows)
        torch.cuda.synchronize()
        phases["mel"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        enc = engine.model.model.encoder(feats).last_hidden_state
        torch.cuda.synchronize()
        phases["encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine._decode_greedy(enc, [engine._sot_sequence("en", "transcribe")] * len(windows), [], [30.0] * len(windows), 0.0)
        torch.cuda.synchronize()
        phases["decode"] = time.perf_counter() - t0
    return statistics.median(walls), phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--batch-sizes", default="16,32,64,128,256")
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark measures the engine on one GPU")

    engine = build_engine(args.tokenizer, getattr(torch, args.dtype))
    engine.fixed_new_tokens = args.tokens
    rng = np.random.default_rng(0)
    opts = TranscribeOptions(language="en")
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.dtype}; "
          f"{args.tokens} tokens per 30 s window; median of {args.repeats}")
    print(f"{'batch':>6}{'wall s':>9}{'RTFx':>10}{'mel s':>8}{'enc s':>8}{'dec s':>8}{'peak GiB':>10}")
    best = (0.0, 0)
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        windows = [Window(rng.normal(0, 0.1, 30 * SAMPLE_RATE).astype(np.float32), 0.0, opts) for _ in range(b)]
        engine.transcribe_windows(windows[: min(b, 8)])  # warm-up
        torch.cuda.reset_peak_memory_stats()
        wall, ph = time_batch(engine, windows, args.repeats)
        rtfx = b * 30.0 / wall
        best = max(best, (rtfx, b))
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{b:>6}{wall:>9.3f}{rtfx:>10.0f}{ph['mel']:>8.3f}{ph['encoder']:>8.3f}{ph['decode']:>8.3f}{peak:>10.1f}")
    print(f"RESULT best_rtfx={best[0]:.0f} at_batch={best[1]}")


if __name__ == "__main__":
    main()
