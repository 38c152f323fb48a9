"""The Whisper engine: windows from many inputs decoded together, stitched back per input.

Flow: `speech.windowing.WindowPlanner` cuts each input at pauses into <= 30 s windows (no
model needed); `transcribe_windows` turns any list of windows, from any number of inputs and
requests, into one batch through the encoder and a greedy decoding loop with Whisper's
timestamp rules; `speech.windowing.stitch` puts each input's windows back together with exact
offsets. `speech.pipeline` runs the three steps for every entry point (the Serve replica only
decodes windows); `transcribe` here is the ASR-only shortcut for tests and benchmarks.

The decoding loop is our own rather than `generate()`: a plain loop over the decoder with a
KV cache applies the timestamp rules batched as tensor masks, and yields the per-window
no-speech probability and log-probabilities the hallucination guards need, at a fraction of
generate's per-step overhead.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from speech.alignment import token_timings
from speech.request import Capabilities, TranscriptionRequest, check_request
from speech.types import SAMPLE_RATE, Segment, TranscribeOptions, Transcript, Window, WindowResult, Word
from speech.vad import VadParams
from speech.windowing import WindowPlanner, stitch, vad_kind_for

log = logging.getLogger(__name__)

TIME_PRECISION = 0.02
N_SAMPLES = 30 * SAMPLE_RATE
N_FFT = 400
HOP_LENGTH = 160
MAX_NEW_TOKENS = 224
COMPRESSION_RATIO_LIMIT = 2.4
LOGPROB_LIMIT = -1.0
NO_SPEECH_LIMIT = 0.6
FALLBACK_TEMPERATURES = (0.2, 0.6)
LANGUAGE_PROBS_KEPT = 5
"""Languages (likeliest first) whose detection probability a window result carries."""


@dataclass
class _Decoded:
    tokens: list[int]
    logprobs: list[float]
    no_speech_prob: float
    temperature: float

    @property
    def avg_logprob(self) -> float:
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(gzip.compress(data)) if data else 0.0


MAX_SKIP_RETRIES = 2
MIN_WORDS_PER_SPEECH_S = 0.8
MIN_GAP_SPEECH_S = 1.5
"""Speech between two segments that no segment covers, past which it is decoded again."""
GAP_PAD_S = 0.2
"""Below this a segment's text cannot be all that was said (read speech runs ~2.5 words/s)."""


def _skip_point(seg: Segment, speech: Sequence[tuple[float, float]]) -> float | None:
    """Where to resume decoding inside a segment whose text is too short for its speech."""
    spoken = sum(max(0.0, min(b, seg.end) - max(a, seg.start)) for a, b in speech)
    words = len(seg.text.split())
    if spoken < 4.0 or words >= MIN_WORDS_PER_SPEECH_S * spoken:
        return None
    said_until = seg.start + words / 2.5  # time the words that were produced could take
    later = [a for a, _ in speech if said_until <= a < seg.end - 1.0]
    return later[0] if later else None


def _skipped_gaps(segments: Sequence[Segment], speech: Sequence[tuple[float, float]],
                  duration_s: float) -> list[tuple[int, float, float]]:
    """Stretches between segments (and after the last) that hold speech no segment covers:
    (index to insert before, start, end), trimmed to that speech with a little padding."""
    if not segments:
        return []  # the no-speech guard or the model judged the whole window silent: trust it
    gaps = []
    bounds = [s.start for s in segments[1:]] + [duration_s]
    for i, (seg, nxt) in enumerate(zip(segments, bounds, strict=True)):
        inside = [(max(a, seg.end), min(b, nxt)) for a, b in speech if b > seg.end and a < nxt]
        inside = [(a, b) for a, b in inside if b > a]
        if sum(b - a for a, b in inside) < MIN_GAP_SPEECH_S:
            continue
        start = max(seg.end, inside[0][0] - GAP_PAD_S)
        end = min(nxt, inside[-1][1] + GAP_PAD_S)
        gaps.append((i + 1, start, end))
    return gaps


def _window_seed(encoded: torch.Tensor, temperature: float) -> int:
    """A seed that depends only on what the window holds and the sampling temperature."""
    first = encoded[0].detach().float().cpu().numpy().tobytes()
    return zlib.crc32(first + struct.pack("<d", temperature)) * 1_000_003


def _seeded_sample(probs: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """One token per row, drawn with that row's own seed (batch composition does not matter)."""
    gen = torch.Generator(device=probs.device)
    out = torch.empty(len(seeds), dtype=torch.long, device=probs.device)
    for j, seed in enumerate(seeds):
        gen.manual_seed(seed % (2**63))
        out[j] = torch.multinomial(probs[j], 1, generator=gen)[0]
    return out


class _TimestampRules:
    """Whisper's token rules as batched masks, shared by greedy and beam decoding.

    Suppressed tokens, a first token that is a timestamp of at most 1.0 s, timestamps in
    pairs and never going backwards nor past the window's audio, and a timestamp forced
    whenever all timestamps together are likelier than any text token.
    """

    def __init__(self, engine: WhisperEngine, vocab: int, durations: Sequence[float], *, no_eot: bool = False):
        dev = engine.device
        self.tb = tb = engine.timestamp_begin
        suppress = torch.zeros(vocab, dtype=torch.bool, device=dev)
        suppress[[t for t in engine.suppress if t < vocab]] = True
        suppress[engine.no_timestamps] = True
        suppress[engine.sot] = suppress[engine.sot_prev] = suppress[engine.no_speech] = True
        begin_suppress = suppress.clone()
        begin_suppress[engine.begin_suppress] = True
        begin_suppress[:tb] = True  # the first token is a timestamp ...
        begin_suppress[tb + 51 :] = True  # ... of at most 1.0 s (max_initial_timestamp)
        if no_eot:  # benchmarks: fixed_new_tokens
            suppress[engine.eot] = begin_suppress[engine.eot] = True
        self.suppress, self.begin_suppress = suppress, begin_suppress
        self.vocab_idx = torch.arange(vocab, device=dev)
        # a timestamp past the end of the window's audio is never allowed
        last_ts = torch.tensor([tb + min(int(round(d / TIME_PRECISION)), 1500) for d in durations], device=dev)
        self.too_late = self.vocab_idx[None, :] > last_ts[:, None]
        """Per window (rows follow the windows: index it like the decoding rows)."""
        self.is_ts = self.vocab_idx[None, :] >= tb
        self.is_text = self.vocab_idx[None, :] < engine.eot

    def scores(self, logits: torch.Tensor, step: int, last_was_ts: torch.Tensor, penult_was_ts: torch.Tensor,
               last_ts_value: torch.Tensor, too_late: torch.Tensor) -> torch.Tensor:
        """`logits` (rows, vocab) with every token the rules forbid at `step` set to -inf."""
        tb, vocab_idx, is_ts = self.tb, self.vocab_idx, self.is_ts
        mask = (self.begin_suppress if step == 0 else self.suppress)[None, :] | too_late
        if step > 0:
            # after a pair of timestamps (or one at the start) text must follow
            mask = mask | (last_was_ts & penult_was_ts)[:, None] & is_ts
            # after a single timestamp another timestamp or eot must follow
            closing = last_was_ts & ~penult_was_ts
            mask = mask | closing[:, None] & self.is_text
            # timestamps never go backwards; a closing one may be repeated once as the
            # next opening one, otherwise the next must be later
            min_ts = torch.where(closing, last_ts_value, last_ts_value + 1)
            mask = mask | is_ts & (vocab_idx[None, :] < min_ts[:, None])
        scores = logits.masked_fill(mask, float("-inf"))
        lp = torch.log_softmax(scores, dim=-1)
        # when timestamps together are likelier than any text token, emit a timestamp
        force_ts = torch.logsumexp(lp[:, tb:], dim=-1) > lp[:, :tb].max(dim=-1).values
        scores[:, :tb].masked_fill_(force_ts[:, None], float("-inf"))
        return scores


_SENTENCE_END = tuple(".。!！?？")
_END_SLACK_S = 0.2


def _snap_onset_to_speech(word: Word, speech: Sequence[tuple[float, float]]) -> None:
    """Move a word's onset out of silence to where the speech it belongs to begins."""
    if not speech or any(s <= word.start < e for s, e in speech):
        return
    later = [s for s, _ in speech if word.start < s < word.end]
    if later:
        word.start = later[-1]


def _snap_end_to_speech(word: Word, speech: Sequence[tuple[float, float]]) -> None:
    """Move a word's end out of the silence after it to where the speech before it ends."""
    if not speech or any(s < word.end <= e for s, e in speech):
        return
    earlier = [e for _, e in speech if word.start < e < word.end]
    if earlier:
        word.end = earlier[-1]


_MIN_WORD_S = TIME_PRECISION
"""Shortest word: one encoder frame."""


def _spread_instant_words(words: list[Word]) -> None:
    """Give the words that DTW left without duration a share of a neighbour's time.

    DTW passes several tokens on one frame where the model reads them as one sound ("I
    didn't" at 8.98-8.98 and 8.98-9.20); each run of such words shares the time of the word
    after it (before it at a segment's end), by length in characters. A segment none of
    whose words has time is left alone: the alignment found no audio for its text.
    """
    n = len(words)
    if not any(w.end - w.start >= _MIN_WORD_S for w in words):
        return
    i = 0
    while i < n:
        if words[i].end - words[i].start >= _MIN_WORD_S:
            i += 1
            continue
        j = i
        while j < n and words[j].end - words[j].start < _MIN_WORD_S:
            j += 1
        group = words[i : j + 1] if j < n else words[i - 1 : j]
        lo, hi = group[0].start, max(group[-1].end, group[0].start)
        weights = [max(1, len(w.word.strip())) for w in group]
        t = lo
        for w, weight in zip(group, weights, strict=True):
            w.start, t = t, t + (hi - lo) * weight / sum(weights)
            w.end = t
        group[-1].end = hi
        for w in group:  # a run too long for the time it shares: a frame each
            if w.end - w.start < _MIN_WORD_S:
                if w.end >= _MIN_WORD_S:
                    w.start = w.end - _MIN_WORD_S
                else:
                    w.end = w.start + _MIN_WORD_S
        i = j + 1


def _fit_segments_to_speech(result: WindowResult, speech: Sequence[tuple[float, float]]) -> None:
    """Segments inside the speech the VAD heard, and none without duration.

    A segment with words has its times from them (already fitted). One without words keeps of
    its timestamps the stretch from the first to the last speech in it. What is then left
    without duration is dropped, as openai-whisper and faster-whisper do: with word timestamps
    that is text the alignment found no audio for, typically a phrase the model repeated
    (six "Hello." for two on a telephone call).
    """
    probs = result.token_probs or [[] for _ in result.segments]
    kept: list[tuple[Segment, list[float]]] = []
    for seg, p in zip(result.segments, probs, strict=True):
        if not seg.words and speech:
            inside = [(max(a, seg.start), min(b, seg.end)) for a, b in speech if b > seg.start and a < seg.end]
            if inside and inside[-1][1] - inside[0][0] >= 2 * TIME_PRECISION:
                seg.start, seg.end = inside[0][0], inside[-1][1]
        if seg.end - seg.start >= TIME_PRECISION / 2:
            kept.append((seg, p))
    result.segments = [s for s, _ in kept]
    if result.token_probs:
        result.token_probs = [p for _, p in kept]


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op threads, then restore the process's setting."""
    before = torch.get_num_threads()
    if not threads or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def model_capabilities(spec: str, cache_dir: Path | None = None, *, diarization: bool = True,
                       diarization_reason: str | None = None) -> Capabilities | None:
    """What model `spec` can do (multilingual or not, its languages) without loading or
    converting its weights: read from its tokenizer or generation config. None when that needs
    a download (a hub id); the engine checks again once loaded (`WhisperEngine.capabilities`).
    Diarization is not the model's to judge: it is reported as given."""
    from speech.model_store import whisper_languages

    found = whisper_languages(spec, cache_dir)
    if found is None:
        return None
    multilingual, languages = found
    return Capabilities(model=spec, multilingual=multilingual, languages=languages,
                        diarization=diarization, diarization_reason=diarization_reason)


class WhisperEngine:
    """Whisper through transformers, loaded once, called with batches of windows."""

    def __init__(
        self,
        model: str = "tiny.en",
        device: str = "cpu",
        cache_dir: Path | None = None,
        *,
        quantize: bool = False,
        max_batch_size: int = 32,
        vad: str | None = None,
        vad_params: VadParams | None = None,
    ) -> None:
        self.model_spec = model
        self.device = resolve_device(device)
        self.cache_dir = cache_dir
        # Dynamic int8 (CPU) costs accuracy and, in the decoder, scales activations per batch, so
        # a window's text would depend on which other windows share its batch: opt-in.
        self.quantize = bool(quantize)
        self.max_batch_size = max_batch_size
        self.fixed_new_tokens: int | None = None
        """Benchmarks only: decode exactly this many tokens per window, ignoring end of text."""
        self.planner = WindowPlanner(vad or vad_kind_for(self.device), vad_params)
        self.model = None
        self.load_seconds = 0.0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Resolve, convert if needed and load the model; a second call does nothing."""
        if self.model is not None:
            return
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from speech.model_store import DEFAULT_CACHE_DIR, resolve_whisper_model

        t0 = time.perf_counter()
        if self.cache_dir is None:
            self.cache_dir = DEFAULT_CACHE_DIR
        path = resolve_whisper_model(self.model_spec, Path(self.cache_dir))
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        model = WhisperForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa"
        )
        model = model.to(self.device).eval()
        if self.device == "cpu" and self.quantize:
            # Opt-in: every Linear layer in dynamic int8 (the encoder ~25% faster on CPU). Off by
            # default: the int8 encoder cost 4.5 WER points on German and 3.6 on French against
            # fp32 and faster-whisper on the same weights (bench/multilingual.py), and in the
            # decoder the per-batch activation scales make a window's text depend on its
            # batch-mates.
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        processor = WhisperProcessor.from_pretrained(path)
        self._attach(model, processor.feature_extractor, processor.tokenizer)
        self.planner.load()
        self.load_seconds = time.perf_counter() - t0
        log.info("whisper model loaded", extra={"model": self.model_name, "seconds": self.load_seconds})

    @classmethod
    def from_model(cls, model, feature_extractor, tokenizer, device: str, **kwargs) -> WhisperEngine:
        """An engine around an already built model (benchmarks with random weights, tests)."""
        engine = cls(model="in-memory", device=device, **kwargs)
        engine._attach(model.to(engine.device).eval(), feature_extractor, tokenizer)
        engine.vad.load()
        return engine

    def _attach(self, model, feature_extractor, tokenizer) -> None:
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.generation_config = model.generation_config
        self._init_tokens()
        self._dtype = torch.float16 if self.device == "cuda" else torch.float32
        self._hann = torch.hann_window(N_FFT, device=self.device)
        self._mel_filters = torch.from_numpy(np.asarray(feature_extractor.mel_filters, dtype=np.float32)).T.to(self.device)
        self.model = model

    def _init_tokens(self) -> None:
        tok = self.tokenizer
        ids = tok.convert_tokens_to_ids
        self.eot = ids("<|endoftext|>")
        self.sot = ids("<|startoftranscript|>")
        self.sot_prev = ids("<|startofprev|>")
        self.no_timestamps = ids("<|notimestamps|>")
        self.timestamp_begin = self.no_timestamps + 1
        no_speech = [ids(t) for t in ("<|nospeech|>", "<|nocaptions|>")]
        self.no_speech = next(t for t in no_speech if t is not None and t != tok.unk_token_id)
        self.is_multilingual = bool(getattr(self.generation_config, "is_multilingual", False))
        self.lang_to_id: dict[str, int] = {}
        if self.is_multilingual:
            self.lang_to_id = {
                k.strip("<|>"): v for k, v in self.generation_config.lang_to_id.items()
            }
            self.transcribe_id = ids("<|transcribe|>")
            self.translate_id = ids("<|translate|>")
        self.suppress = list(getattr(self.generation_config, "suppress_tokens", None) or [])
        self.begin_suppress = list(
            getattr(self.generation_config, "begin_suppress_tokens", None) or [self.eot]
        )
        heads = getattr(self.generation_config, "alignment_heads", None) or []
        self.alignment_heads = [tuple(h) for h in heads]

    @property
    def model_name(self) -> str:
        return self.model_spec

    def languages(self) -> list[str]:
        return sorted(self.lang_to_id) if self.is_multilingual else ["en"]

    # ---------------------------------------------------------------- public API
    @property
    def vad(self):  # type: ignore[no-untyped-def]
        return self.planner.vad

    def capabilities(self, *, diarization: bool = False,
                     diarization_reason: str | None = None) -> Capabilities:
        """What this model can do, for `speech.request.check_request`."""
        self.load()
        return Capabilities(model=self.model_name, multilingual=bool(self.is_multilingual),
                            languages=tuple(self.languages()), diarization=diarization,
                            diarization_reason=diarization_reason, device=self.device,
                            vad=self.planner.vad_kind)

    def check_options(self, options: TranscribeOptions) -> None:
        """Refuse what this model cannot do, before any audio is processed."""
        check_request(TranscriptionRequest(options=options), self.capabilities(diarization=True))

    def transcribe(
        self, audios: Sequence[np.ndarray], options: TranscribeOptions | Sequence[TranscribeOptions]
    ) -> list[Transcript]:
        """Transcribe several inputs, their windows batched together (ASR only: speakers are
        `speech.pipeline`'s)."""
        opts = [options] * len(audios) if isinstance(options, TranscribeOptions) else list(options)
        for o in dict.fromkeys(opts):
            self.check_options(o)
        per_input = [self.planner.plan(a, o) for a, o in zip(audios, opts, strict=True)]
        results = self.transcribe_windows([w for ws in per_input for w in ws])
        out, k = [], 0
        for audio, windows, o in zip(audios, per_input, opts, strict=True):
            out.append(stitch(len(audio) / SAMPLE_RATE, windows, results[k : k + len(windows)], o))
            k += len(windows)
        return out

    def transcribe_windows(self, windows: Sequence[Window], *, threads: int | None = None) -> list[WindowResult]:
        """Decode any windows in as few model calls as their options allow.

        `threads`: torch threads for this call only (CPU): a caller that knows the machine is
        otherwise idle lends the model its spare cores (a lone request decoded 20 % sooner on
        two cores), and takes them back for batches that share the machine with other work.
        """
        self.load()
        results: list[WindowResult | None] = [None] * len(windows)
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(windows):
            o = w.options
            # windows that differ only in word_timestamps still share one decoding batch
            groups.setdefault((o.task, o.language, o.initial_prompt, o.beam_size, o.temperature), []).append(i)
        with self._lock, torch.inference_mode(), _torch_threads(threads):
            for idx in groups.values():
                for start in range(0, len(idx), self.max_batch_size):
                    chunk = idx[start : start + self.max_batch_size]
                    for i, r in zip(chunk, self._transcribe_group([windows[i] for i in chunk]), strict=True):
                        results[i] = r
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------- internals
    def _features(self, windows: Sequence[Window]) -> torch.Tensor:
        """Whisper's log-mel spectrogram of 30 s windows, computed batched on the model's device.

        As in Whisper's own decoding (and faster-whisper's), a window shorter than 30 s is
        normalised over its own frames and the rest of the 3,000 frames is padded with zeros
        *after* normalisation; transformers' feature extractor pads the audio instead, which gives
        the model a different "silence" than it was trained on. Same arithmetic as
        WhisperFeatureExtractor over the audio's frames (checked in tests), without its round
        trip through numpy per window, which on a GPU cost more than the encoder.
        """
        n = N_SAMPLES
        # zeros after the 30 s, as Whisper's padding: the last frame is not reflected audio
        batch = np.zeros((len(windows), n + N_FFT), dtype=np.float32)
        frames = []
        for k, w in enumerate(windows):
            batch[k, : min(n, len(w.samples))] = w.samples[:n]
            frames.append(max(1, min(n, len(w.samples)) // HOP_LENGTH))
        audio = torch.from_numpy(batch).to(self.device)
        stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=self._hann, return_complex=True)
        power = stft[..., : n // HOP_LENGTH].abs() ** 2
        mel = self._mel_filters @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        content = torch.arange(log_spec.shape[-1], device=self.device)[None, :] < torch.tensor(
            frames, device=self.device)[:, None]
        content = content[:, None, :]
        peak = torch.where(content, log_spec, torch.full_like(log_spec, -torch.inf)).amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return torch.where(content, (log_spec + 4.0) / 4.0, torch.zeros_like(log_spec)).to(self._dtype)

    def _encode(self, windows: Sequence[Window]) -> torch.Tensor:
        features = self._features(windows)
        encoder = self.model.model.encoder
        if self.device != "cpu":
            return encoder(features).last_hidden_state
        # one window per call on CPU: 1500 frames already fill the cores, and with `quantize`
        # the dynamic int8 scales stay per window (see load)
        return torch.cat([encoder(f[None]).last_hidden_state for f in features])

    def _prompt_tokens(self, prompt: str | None) -> list[int]:
        if not prompt:
            return []
        ids = self.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False)
        return [self.sot_prev, *ids[-(MAX_NEW_TOKENS - 1) :]]

    def _detect_languages(self, enc: torch.Tensor) -> tuple[list[str], list[dict[str, float]]]:
        """Per window the likeliest language and the `LANGUAGE_PROBS_KEPT` likeliest with their
        probabilities (softmax over the language tokens only, as Whisper's detect_language)."""
        ids = torch.full((enc.shape[0], 1), self.sot, device=self.device)
        logits = self._decoder_logits(ids, enc, cache=None)[:, -1]
        lang_ids = torch.tensor(list(self.lang_to_id.values()), device=self.device)
        probs = torch.softmax(logits[:, lang_ids].float(), dim=-1)
        top_p, top_i = probs.topk(min(LANGUAGE_PROBS_KEPT, probs.shape[-1]), dim=-1)
        names = list(self.lang_to_id)
        kept = [{names[i]: round(float(p), 4) for p, i in zip(ps, idx, strict=True)}
                for ps, idx in zip(top_p.tolist(), top_i.tolist(), strict=True)]
        return [names[idx[0]] for idx in top_i.tolist()], kept

    def _decoder_logits(self, ids: torch.Tensor, enc: torch.Tensor, cache) -> torch.Tensor:
        out = self.model.model.decoder(
            input_ids=ids, encoder_hidden_states=enc, past_key_values=cache, use_cache=cache is not None
        )
        return self.model.proj_out(out.last_hidden_state).float()

    def _transcribe_group(self, windows: list[Window], depth: int = 0,
                          languages: list[str] | None = None) -> list[WindowResult]:
        """`languages`: one per window, already detected (a re-decoded part of a window keeps
        its window's language: a few seconds alone are often misdetected)."""
        opts = windows[0].options
        enc = self._encode(windows)
        lang_probs: list[dict[str, float] | None] = [None] * len(windows)
        if languages is not None:
            langs = list(languages)
        elif self.is_multilingual and not opts.language:
            langs, lang_probs = self._detect_languages(enc)  # type: ignore[assignment]
        else:
            langs = [opts.language or "en"] * len(windows)
        prefixes = [self._sot_sequence(lang, opts.task) for lang in langs]
        prompt = self._prompt_tokens(opts.initial_prompt)
        durations = [w.duration_s for w in windows]
        # As in Whisper, beam search is the decoding at temperature 0; the fallback temperatures
        # (and a temperature asked for) sample, so guards and fallback treat both alike.
        if opts.beam_size > 1 and opts.temperature == 0 and not self.fixed_new_tokens:
            decoded = self._decode_beam(enc, prefixes, prompt, durations, opts.beam_size)
        else:
            decoded = self._decode_greedy(enc, prefixes, prompt, durations, opts.temperature)
        if not self.fixed_new_tokens:
            decoded = self._fallback(enc, prefixes, prompt, durations, decoded, opts.temperature)
        results = []
        for k, dec in enumerate(decoded):
            segments, probs = self._segments(dec, durations[k])
            if dec.no_speech_prob > NO_SPEECH_LIMIT and dec.avg_logprob < LOGPROB_LIMIT:
                segments, probs = [], []  # silence the model would fill with invented text
            results.append(WindowResult(language=langs[k], segments=segments, token_probs=probs,
                                        language_probs=lang_probs[k]))
        if depth < MAX_SKIP_RETRIES and not self.fixed_new_tokens:
            self._recover_skipped_speech(windows, results, depth)
        if depth > 0:
            return results  # the parent window times words and fits segments after insertion
        wanted = [k for k, w in enumerate(windows) if w.options.word_timestamps]
        if wanted:
            self._add_word_timestamps(enc, prefixes, results, windows, wanted)
        for window, result in zip(windows, results, strict=True):
            _fit_segments_to_speech(result, window.speech)
        return results

    def _recover_skipped_speech(self, windows: list[Window], results: list[WindowResult], depth: int) -> None:
        """Decode again what a window's text skipped over.

        Small models sometimes close a segment with a timestamp far ahead of what they said
        ("<|0.00|> of many questions.<|19.16|>" over 19 s of speech), or open the next segment
        seconds after the last one ended with speech in between, silently dropping it;
        sequential Whisper recovers by seeking to its last timestamp, batched windows cannot.
        So: a segment with far fewer words than its speech could hold is cut where its text
        plausibly ends (the next pause the VAD heard), and a stretch of uncovered speech between
        segments is cut out; each becomes a new window, decoded in one batch with all others
        like it, and its segments are put back in place.
        """
        # (window, insert before segment, segment to end at the cut or -1, cut, new window)
        retries: list[tuple[int, int, int, float, Window]] = []
        for k, (window, result) in enumerate(zip(windows, results, strict=True)):
            for i, seg in enumerate(result.segments):
                cut = _skip_point(seg, window.speech)
                if cut is not None:
                    # one per window and round; its tail is re-checked in the next round
                    retries.append((k, i + 1, i, cut, self._sub_window(window, cut, seg.end)))
                    break
            for at, start, end in _skipped_gaps(result.segments, window.speech, window.duration_s):
                retries.append((k, at, -1, start, self._sub_window(window, start, end)))
        if not retries:
            return
        redone = self._transcribe_group([w for *_, w in retries], depth + 1,
                                        [results[k].language for k, *_ in retries])
        # Insert from the back of each window so earlier insertion points stay valid; where a
        # cut segment's tail and the gap after it go in at one place, the gap goes in first.
        order = sorted(range(len(retries)),
                       key=lambda j: (retries[j][0], retries[j][1], retries[j][2] < 0), reverse=True)
        for j in order:
            k, at, trimmed, cut, _ = retries[j]
            result, extra = results[k], redone[j]
            if trimmed >= 0:
                result.segments[trimmed].end = min(result.segments[trimmed].end, cut)
            later = [replace(s, start=s.start + cut, end=s.end + cut) for s in extra.segments]
            result.segments[at:at] = later
            result.token_probs[at:at] = extra.token_probs

    @staticmethod
    def _sub_window(window: Window, start_s: float, end_s: float) -> Window:
        """The part [start_s, end_s) of `window` as a window of its own."""
        start, end = int(start_s * SAMPLE_RATE), int(end_s * SAMPLE_RATE)
        speech = tuple((max(0.0, a - start_s), min(b, end_s) - start_s)
                       for a, b in window.speech if b > start_s and a < end_s)
        return Window(window.samples[start:end], window.offset_s + start_s, window.options,
                      window.index, speech)

    def _sot_sequence(self, language: str, task: str) -> list[int]:
        if not self.is_multilingual:
            return [self.sot]
        task_id = self.translate_id if task == "translate" else self.transcribe_id
        return [self.sot, self.lang_to_id[language], task_id]

    def _fallback(self, enc, prefixes, prompt, durations, decoded, base_temperature):
        """Re-decode, with sampling, the windows that look like repetition loops or gibberish."""
        for temperature in FALLBACK_TEMPERATURES:
            if temperature <= base_temperature:
                continue
            bad = [
                k
                for k, d in enumerate(decoded)
                if not self._passes(d) and not d.no_speech_prob > NO_SPEECH_LIMIT
            ]
            if not bad:
                break
            retry = self._decode_greedy(
                enc[bad], [prefixes[k] for k in bad], prompt, [durations[k] for k in bad], temperature
            )
            for k, d in zip(bad, retry, strict=True):
                if self._passes(d) or d.avg_logprob > decoded[k].avg_logprob:
                    decoded[k] = d
        return decoded

    def _passes(self, d: _Decoded) -> bool:
        text = self.tokenizer.decode(self._text_tokens(d.tokens))
        return _compression_ratio(text) <= COMPRESSION_RATIO_LIMIT and d.avg_logprob >= LOGPROB_LIMIT

    def _text_tokens(self, tokens: list[int]) -> list[int]:
        return [t for t in tokens if t < self.eot]

    def _decode_greedy(
        self,
        enc: torch.Tensor,
        prefixes: list[list[int]],
        prompt: list[int],
        durations: list[float],
        temperature: float,
    ) -> list[_Decoded]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        batch = enc.shape[0]
        dev = self.device
        init = torch.tensor([prompt + p for p in prefixes], device=dev)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        logits = self._decoder_logits(init, enc, cache)
        no_speech = torch.softmax(logits[:, len(prompt)], dim=-1)[:, self.no_speech]
        logits = logits[:, -1]

        tb = self.timestamp_begin
        rules = _TimestampRules(self, logits.shape[-1], durations, no_eot=bool(self.fixed_new_tokens))
        too_late = rules.too_late

        # Sampling (temperature fallback) is seeded per window from its encoder output, so a
        # window gets the same text whatever its batch-mates and however often it is sent.
        row_seeds = [_window_seed(enc[k], temperature) for k in range(batch)] if temperature > 0 else []
        n_steps = self.fixed_new_tokens or MAX_NEW_TOKENS
        # Results per original row; the loop itself runs on the rows still decoding (`active`):
        # windows finish after 40 to 200 tokens, and finished rows are dropped from the batch
        # and the KV cache instead of being carried along to the end.
        tokens = torch.full((batch, n_steps), self.eot, dtype=torch.long, device=dev)
        logprobs = torch.zeros((batch, n_steps), device=dev)
        active = torch.arange(batch, device=dev)
        finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        # Whisper's rules read the sequence as if it were preceded by a timestamp pair.
        last_was_ts = torch.ones(batch, dtype=torch.bool, device=dev)
        penult_was_ts = torch.ones(batch, dtype=torch.bool, device=dev)
        last_ts_value = torch.full((batch,), tb - 1, dtype=torch.long, device=dev)

        for step in range(n_steps):
            scores = rules.scores(logits, step, last_was_ts, penult_was_ts, last_ts_value, too_late)
            # a row the rules left without any choice (only with fixed_new_tokens) takes text
            stuck = torch.isinf(scores).all(dim=-1, keepdim=True)
            scores = torch.where(stuck, logits, scores)
            if temperature > 0:
                probs = torch.softmax(scores / temperature, dim=-1)
                nxt = _seeded_sample(probs, [row_seeds[r] + step for r in active.tolist()])
            else:
                nxt = scores.argmax(dim=-1)
            tok_lp = torch.log_softmax(scores, dim=-1).gather(1, nxt[:, None]).squeeze(1)
            tokens[active, step] = nxt
            logprobs[active, step] = tok_lp

            now_ts = nxt >= tb
            last_ts_value = torch.where(now_ts, nxt, last_ts_value)
            penult_was_ts = last_was_ts
            last_was_ts = now_ts
            finished = nxt == self.eot
            if bool(finished.all()):
                break
            if bool(finished.any()):
                keep = (~finished).nonzero().squeeze(1)
                active, nxt, enc = active[keep], nxt[keep], enc[keep]
                last_ts_value, penult_was_ts, last_was_ts = last_ts_value[keep], penult_was_ts[keep], last_was_ts[keep]
                too_late = too_late[keep]
                cache.reorder_cache(keep)
            logits = self._decoder_logits(nxt[:, None], enc, cache)[:, -1]

        out = []
        for k in range(batch):
            row = tokens[k].tolist()
            n = row.index(self.eot) if self.eot in row else len(row)
            out.append(
                _Decoded(
                    tokens=row[:n],
                    logprobs=logprobs[k, : n + (1 if n < len(row) else 0)].tolist(),
                    no_speech_prob=float(no_speech[k]),
                    temperature=temperature,
                )
            )
        return out

    def _decode_beam(
        self,
        enc: torch.Tensor,
        prefixes: list[list[int]],
        prompt: list[int],
        durations: list[float],
        beam_size: int,
    ) -> list[_Decoded]:
        """Beam search over the same decoder loop, rules and scores as greedy decoding.

        openai-whisper's BeamSearchDecoder with patience 1: each step every live beam proposes
        its beam_size + 1 likeliest tokens; per window the candidates are taken in order of
        their summed log-probability, those ending in <|endoftext|> become finished hypotheses
        and the first beam_size others the next beams, until a window has beam_size finished
        hypotheses. The winner maximises its summed log-probability over its length; like a
        greedy result it carries the log-probability of each of its tokens (avg_logprob is
        their mean, end of text included) and the window's no-speech probability from the
        first decoding step, so the hallucination guards and the fallback apply unchanged.
        """
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        n_audio, beams, dev = enc.shape[0], beam_size, self.device
        init = torch.tensor([prompt + p for p in prefixes], device=dev)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        logits = self._decoder_logits(init, enc, cache)
        no_speech = torch.softmax(logits[:, len(prompt)], dim=-1)[:, self.no_speech].tolist()
        logits = logits[:, -1]
        tb = self.timestamp_begin
        rules = _TimestampRules(self, logits.shape[-1], durations)

        # `beams` rows per window still decoding, window after window; at the first step all
        # of a window's rows are the same, so only its first row may propose candidates.
        rows = torch.arange(n_audio, device=dev).repeat_interleave(beams)
        cache.reorder_cache(rows)
        enc, logits, too_late = enc[rows], logits[rows], rules.too_late[rows]
        sum_lp = torch.zeros(n_audio, beams, device=dev)
        sum_lp[:, 1:] = float("-inf")
        sum_lp = sum_lp.view(-1)
        n_steps = MAX_NEW_TOKENS
        tokens = torch.full((len(rows), n_steps), self.eot, dtype=torch.long, device=dev)
        logprobs = torch.zeros((len(rows), n_steps), device=dev)
        last_was_ts = torch.ones(len(rows), dtype=torch.bool, device=dev)
        penult_was_ts = torch.ones(len(rows), dtype=torch.bool, device=dev)
        last_ts_value = torch.full((len(rows),), tb - 1, dtype=torch.long, device=dev)
        active = list(range(n_audio))  # windows still decoding, in row order
        finished: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(n_audio)]

        for step in range(n_steps):
            scores = rules.scores(logits, step, last_was_ts, penult_was_ts, last_ts_value, too_late)
            lp = torch.log_softmax(scores, dim=-1)
            top_lp, top_tok = lp.topk(beams + 1, dim=-1)  # (rows, beams + 1)
            cand = (sum_lp[:, None] + top_lp).view(len(active), -1)
            order = cand.argsort(dim=-1, descending=True).tolist()
            cand_l, top_lp_l, top_tok_l = cand.tolist(), top_lp.tolist(), top_tok.tolist()
            src, new_tok, new_lp, new_sum, still = [], [], [], [], []
            for a, w in enumerate(active):
                picked: list[tuple[int, int, float, float]] = []
                for c in order[a]:
                    score = cand_l[a][c]
                    if score == float("-inf"):
                        break
                    r, j = a * beams + c // (beams + 1), c % (beams + 1)
                    tok, tok_lp = top_tok_l[r][j], top_lp_l[r][j]
                    if tok == self.eot:
                        if len(finished[w]) < beams:
                            finished[w].append(
                                (score, tokens[r, :step].tolist(), logprobs[r, :step].tolist() + [tok_lp])
                            )
                        continue
                    picked.append((r, tok, tok_lp, score))
                    if len(picked) == beams:
                        break
                if len(finished[w]) >= beams:
                    continue
                if not picked or step == n_steps - 1:
                    # out of length or of choices: live beams count as hypotheses where too
                    # few have finished (unterminated, so without an end-of-text score)
                    live = [(score, tokens[r, :step].tolist() + [tok], logprobs[r, :step].tolist() + [tok_lp])
                            for r, tok, tok_lp, score in picked]
                    if not picked:
                        live = [(float(sum_lp[r]), tokens[r, :step].tolist(), logprobs[r, :step].tolist())
                                for r in range(a * beams, (a + 1) * beams) if sum_lp[r] > float("-inf")]
                    finished[w] += sorted(live, key=lambda h: -h[0])[: beams - len(finished[w])]
                    continue
                still.append(w)
                # a window the rules leave fewer live candidates than beams pads with dead beams
                picked += [(picked[0][0], picked[0][1], 0.0, float("-inf"))] * (beams - len(picked))
                for r, tok, tok_lp, score in picked:
                    src.append(r)
                    new_tok.append(tok)
                    new_lp.append(tok_lp)
                    new_sum.append(score)
            if not still:
                break
            idx = torch.tensor(src, device=dev)
            nxt = torch.tensor(new_tok, device=dev)
            tokens, logprobs = tokens[idx], logprobs[idx]
            tokens[:, step] = nxt
            logprobs[:, step] = torch.tensor(new_lp, device=dev)
            sum_lp = torch.tensor(new_sum, device=dev)
            now_ts = nxt >= tb
            last_ts_value = torch.where(now_ts, nxt, last_ts_value[idx])
            penult_was_ts = last_was_ts[idx]
            last_was_ts = now_ts
            too_late = too_late[idx]
            # a window's beams share its encoder output and cross-attention keys: those follow
            # only when windows leave the batch
            cache.self_attention_cache.reorder_cache(idx)
            if len(still) < len(active):
                enc = enc[idx]
                cache.cross_attention_cache.reorder_cache(idx)
            active = still
            logits = self._decoder_logits(nxt[:, None], enc, cache)[:, -1]

        out = []
        for w in range(n_audio):
            # openai-whisper's ranking without a length penalty: summed log-probability / length
            score, toks, lps = max(finished[w], key=lambda h: h[0] / max(1, len(h[1])))
            out.append(_Decoded(tokens=toks, logprobs=lps, no_speech_prob=float(no_speech[w]), temperature=0.0))
        return out

    def _segments(self, dec: _Decoded, duration: float) -> tuple[list[Segment], list[list[float]]]:
        """Split a window's tokens at timestamp tokens into segments (times relative), with
        the probability of each segment's text tokens.

        Each segment carries its own statistics: avg_logprob is the mean log-probability of
        the tokens that make it (opening timestamp, text, closing timestamp, or the end of text
        that closes the last one) and compression_ratio that of its own text. no_speech_prob
        and temperature are the window's, as in Whisper: the no-speech probability is read
        once, at the first decoding step, and the temperature is that of the whole decoding.
        The window's own avg_logprob and compression ratio, over all its tokens, are what the
        no-speech guard and the temperature fallback judge.
        """
        tb = self.timestamp_begin
        segments: list[Segment] = []
        probs: list[list[float]] = []
        text_tokens: list[int] = []
        text_probs: list[float] = []
        seg_logprobs: list[float] = []
        start: float | None = None

        def close(end: float) -> None:
            nonlocal text_tokens, text_probs, seg_logprobs, start
            text = self.tokenizer.decode(text_tokens)
            if text.strip():
                probs.append(list(text_probs))
                s = 0.0 if start is None else start
                segments.append(
                    Segment(
                        id=0,
                        start=s,
                        end=max(end, s),
                        text=text,
                        tokens=list(text_tokens),
                        avg_logprob=float(np.mean(seg_logprobs)) if seg_logprobs else 0.0,
                        compression_ratio=_compression_ratio(text),
                        no_speech_prob=dec.no_speech_prob,
                        temperature=dec.temperature,
                    )
                )
            text_tokens, text_probs, seg_logprobs, start = [], [], [], None

        lps = dec.logprobs
        for i, t in enumerate(dec.tokens):
            lp = [lps[i]] if i < len(lps) else []
            if t >= tb:
                ts = (t - tb) * TIME_PRECISION
                if text_tokens:
                    seg_logprobs += lp
                    close(ts)
                else:
                    seg_logprobs = list(lp)  # opens the next segment
                start = ts
            elif t < self.eot:
                text_tokens.append(t)
                seg_logprobs += lp
                text_probs.append(float(np.exp(lps[i])) if i < len(lps) else 1.0)
        if text_tokens:
            seg_logprobs += lps[len(dec.tokens) : len(dec.tokens) + 1]  # the end of text
            close(duration)
        return segments, probs

    # ----------------------------------------------------------- word timestamps
    def _add_word_timestamps(
        self,
        enc: torch.Tensor,
        prefixes: list[list[int]],
        results: list[WindowResult],
        windows: list[Window],
        wanted: list[int],
    ) -> None:
        rows = [k for k in wanted if results[k].segments]
        if not rows or not self.alignment_heads:
            return
        seqs = []
        for k in rows:
            text = [t for s in results[k].segments for t in s.tokens]
            seqs.append(prefixes[k] + [self.no_timestamps] + text + [self.eot])
        attn = self._alignment_attention(enc[rows], seqs)
        for j, k in enumerate(rows):
            n_seq = len(seqs[j])
            n_text = n_seq - len(prefixes[k]) - 2
            n_frames = min(1500, int(round(windows[k].duration_s / TIME_PRECISION)) + 1)
            timings = token_timings(attn[j, :, :n_seq], n_text, max(n_frames, 2))
            self._assign_words(results[k], timings, windows[k].speech)

    def _alignment_attention(self, enc: torch.Tensor, seqs: list[list[int]]) -> np.ndarray:
        """Cross-attention of the alignment heads, (batch, heads, tokens, frames), teacher forced."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.eot, dtype=torch.long, device=self.device)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
        layers = sorted({layer for layer, _ in self.alignment_heads})
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        decoder = self.model.model.decoder
        for layer in layers:
            attn_mod = decoder.layers[layer].encoder_attn

            def hook(mod, args, kwargs, output, layer=layer):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                kv = kwargs.get("key_value_states")
                q = mod.q_proj(hidden) * mod.scaling
                kk = mod.k_proj(kv)
                b, t, _ = q.shape
                q = q.view(b, t, mod.num_heads, mod.head_dim).transpose(1, 2)
                kk = kk.view(b, -1, mod.num_heads, mod.head_dim).transpose(1, 2)
                captured[layer] = torch.softmax((q @ kk.transpose(-1, -2)).float(), dim=-1)

            hooks.append(attn_mod.register_forward_hook(hook, with_kwargs=True))
        try:
            decoder(input_ids=ids, encoder_hidden_states=enc, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        stacked = torch.stack([captured[layer][:, head] for layer, head in self.alignment_heads], dim=1)
        return stacked.cpu().numpy()

    def _assign_words(self, result: WindowResult, timings, speech: Sequence[tuple[float, float]]) -> None:
        """Group each segment's tokens into words, time them, and tidy the times.

        As openai-whisper does: a word is timed by its own tokens, without the punctuation
        merged into it (a closing period would swallow the pause after it); DTW puts the first
        token of a window at frame 0 and lets words swallow the pauses around them, so a word
        after a sentence end and a segment's first word longer than twice the median word
        duration keep only that much before their end, and segment timestamps win where the
        words are implausible. Then onsets and ends that still fall in silence the VAD heard
        move to where the speech starts or ends, and words DTW left without duration share
        their neighbour's time (a segment none of whose words has any is dropped later).
        """
        k = 0
        all_words: list[list[Word]] = []
        for seg, probs in zip(result.segments, result.token_probs or [[]] * len(result.segments), strict=True):
            words: list[Word] = []
            local = 0
            for word_text, n_tok in self._split_words(seg.tokens):
                spoken = [i for i, t in enumerate(seg.tokens[local : local + n_tok]) if not self._is_punctuation(t)]
                first, last = (spoken[0], spoken[-1]) if spoken else (0, n_tok - 1)
                t0, t1 = timings[k + first], timings[k + last]
                p = probs[local : local + n_tok]
                words.append(
                    Word(start=t0.start, end=max(t1.end, t0.start), word=word_text,
                         probability=round(float(np.mean(p)) if p else 1.0, 4))
                )
                k += n_tok
                local += n_tok
            all_words.append(words)
        durations = [w.end - w.start for ws in all_words for w in ws if w.end > w.start]
        median = min(0.7, float(np.median(durations))) if durations else 0.0
        longest = 2 * median
        if longest > 0:
            flat = [w for ws in all_words for w in ws]
            for before, w in zip(flat, flat[1:]):
                if w.end - w.start > longest and before.word.rstrip().endswith(_SENTENCE_END):
                    w.start = w.end - longest
        for seg, words in zip(result.segments, all_words, strict=True):
            if not words:
                continue
            if longest > 0 and words[0].end - words[0].start > longest:
                words[0].start = max(0.0, words[0].end - longest)
            if seg.start < words[0].end and seg.start - 0.5 > words[0].start:
                words[0].start = max(0.0, min(words[0].end - median, seg.start))
            else:
                seg.start = words[0].start
            # the closing timestamp token beats a last word stretched into the following pause
            if seg.end > words[-1].start and seg.end + _END_SLACK_S < words[-1].end:
                words[-1].end = max(words[-1].start + median, seg.end)
            else:
                seg.end = words[-1].end
            for w in words:
                _snap_onset_to_speech(w, speech)
                _snap_end_to_speech(w, speech)
            _spread_instant_words(words)
            seg.start, seg.end = words[0].start, words[-1].end
            seg.words = words

    def _is_punctuation(self, token: int) -> bool:
        piece = self.tokenizer.decode([token]).strip()
        return piece != "" and "\ufffd" not in piece and not any(c.isalnum() for c in piece)

    def _split_words(self, tokens: list[int]) -> list[tuple[str, int]]:
        """Words as (text, token count); a word starts at a token with a leading space."""
        words: list[tuple[str, int]] = []
        pending: list[int] = []
        for t in tokens:
            piece = self.tokenizer.decode([t])
            starts_word = piece.startswith(" ") and "\ufffd" not in self.tokenizer.decode(pending or [t])
            is_punct = piece.strip() != "" and all(not c.isalnum() for c in piece.strip())
            if pending and starts_word and not is_punct:
                words.append((self.tokenizer.decode(pending), len(pending)))
                pending = []
            pending.append(t)
        if pending:
            words.append((self.tokenizer.decode(pending), len(pending)))
        return words


__all__ = ["WhisperEngine", "Window", "WindowResult", "model_capabilities", "resolve_device"]
