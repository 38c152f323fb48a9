"""The Whisper engine: windows from many inputs decoded together, stitched back per input.

Flow for one call: `split` cuts each input at pauses into <= 30 s windows (Silero VAD);
`transcribe_windows` turns any list of windows, from any number of inputs and requests, into
one batch through the encoder and a greedy decoding loop with Whisper's timestamp rules;
`stitch` puts each input's windows back together with exact offsets. The Serve replica calls the
three steps separately so that windows of concurrent requests share batches; everyone else
calls `transcribe`.

The decoding loop is our own rather than `generate()`: a plain loop over the decoder with a
KV cache applies the timestamp rules batched as tensor masks, and yields the per-window
no-speech probability and log-probabilities the hallucination guards need, at a fraction of
generate's per-step overhead.
"""

from __future__ import annotations

import gzip
import logging
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from speech.alignment import token_timings
from speech.errors import InvalidOptionError
from speech.types import SAMPLE_RATE, Segment, TranscribeOptions, Transcript, Word
from speech.vad import VadParams, make_vad
from speech.windowing import MAX_WINDOW_S, plan_windows

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


@dataclass
class Window:
    """One <= 30 s piece of one input, ready to be batched with any other window."""

    samples: np.ndarray
    offset_s: float
    options: TranscribeOptions
    index: int = 0
    speech: tuple[tuple[float, float], ...] = ()
    """Where the VAD heard speech, in seconds from the window start (word onsets snap to it)."""

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass
class WindowResult:
    """What the model made of one window; times are relative to the window start."""

    language: str
    segments: list[Segment] = field(default_factory=list)
    token_probs: list[list[float]] = field(default_factory=list, repr=False)
    """Per segment, the probability of each of its text tokens (for word probabilities)."""


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


def _speech_within(regions: Sequence[tuple[int, int]], start: int, end: int) -> tuple[tuple[float, float], ...]:
    """The VAD regions overlapping [start, end), clipped, in seconds from `start`."""
    return tuple(
        ((max(s, start) - start) / SAMPLE_RATE, (min(e, end) - start) / SAMPLE_RATE)
        for s, e in regions
        if e > start and s < end
    )


_SENTENCE_END = tuple(".。!！?？")
_END_SLACK_S = 0.2


def _snap_onset_to_speech(word: Word, speech: Sequence[tuple[float, float]]) -> None:
    """Move a word's onset out of silence to where the speech it belongs to begins."""
    if not speech or any(s <= word.start < e for s, e in speech):
        return
    later = [s for s, _ in speech if word.start < s < word.end]
    if later:
        word.start = later[-1]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
        # Dynamic int8 in the decoder scales activations per batch, so a window's text would
        # depend on which other windows share its batch; results must not, so it is opt-in.
        self.quantize = bool(quantize)
        self.max_batch_size = max_batch_size
        self.fixed_new_tokens: int | None = None
        """Benchmarks only: decode exactly this many tokens per window, ignoring end of text."""
        # Silero costs a fifth of the CPU budget; on a GPU it is noise next to the model.
        self.vad = make_vad(vad or ("silero" if self.device == "cuda" else "energy"), vad_params)
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
        if self.device == "cpu":
            # The encoder's Linear layers in dynamic int8 (~25% faster on CPU). Activation scales
            # are per input tensor, so _encode feeds it one window at a time: a window's encoding
            # never depends on its batch-mates. The decoder (small row counts, batch-dependent
            # scales) stays fp32 unless `quantize` asks for it.
            target = model if self.quantize else model.model.encoder
            quantized = torch.ao.quantization.quantize_dynamic(target, {torch.nn.Linear}, dtype=torch.qint8)
            if self.quantize:
                model = quantized
            else:
                model.model.encoder = quantized
        processor = WhisperProcessor.from_pretrained(path)
        self._attach(model, processor.feature_extractor, processor.tokenizer)
        self.vad.load()
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
    def check_options(self, options: TranscribeOptions) -> None:
        """Refuse what this model cannot do, before any audio is processed."""
        if options.language is not None and options.language not in self.languages():
            raise InvalidOptionError(
                "language",
                f"language {options.language!r} is not supported by model {self.model_name}; "
                f"supported: {', '.join(self.languages()[:20])}"
                + (" ..." if len(self.languages()) > 20 else ""),
            )
        if options.task == "translate" and not self.is_multilingual:
            raise InvalidOptionError(
                "task", f"model {self.model_name} is English-only and cannot translate"
            )
        if not 0.0 <= options.temperature <= 1.0:
            raise InvalidOptionError("temperature", "temperature must be between 0 and 1")
        if not 1 <= options.beam_size <= 10:
            raise InvalidOptionError("beam_size", "beam_size must be between 1 and 10")

    def split(self, audio: np.ndarray, options: TranscribeOptions) -> list[Window]:
        """Cut one input at pauses into windows of at most 30 s (silence is left out)."""
        self.load()
        self.check_options(options)
        regions = self.vad.speech_regions(audio)
        spans = plan_windows(audio, regions, MAX_WINDOW_S)
        return [
            Window(audio[s:e], s / SAMPLE_RATE, options, i, _speech_within(regions, s, e))
            for i, (s, e) in enumerate(spans)
        ]

    def transcribe(
        self, audios: Sequence[np.ndarray], options: TranscribeOptions | Sequence[TranscribeOptions]
    ) -> list[Transcript]:
        """Transcribe several inputs, their windows batched together."""
        self.load()
        opts = [options] * len(audios) if isinstance(options, TranscribeOptions) else list(options)
        per_input = [self.split(a, o) for a, o in zip(audios, opts, strict=True)]
        flat = [w for ws in per_input for w in ws]
        results = self.transcribe_windows(flat)
        out, k = [], 0
        for audio, windows, o in zip(audios, per_input, opts, strict=True):
            out.append(self.stitch(audio, windows, results[k : k + len(windows)], o))
            k += len(windows)
        return out

    def stitch(
        self,
        audio: np.ndarray,
        windows: Sequence[Window],
        results: Sequence[WindowResult],
        options: TranscribeOptions,
    ) -> Transcript:
        """One transcript from an input's windows, times moved to the input's clock."""
        duration = len(audio) / SAMPLE_RATE
        segments: list[Segment] = []
        for window, result in zip(windows, results, strict=True):
            for seg in result.segments:
                off = window.offset_s
                words = [
                    replace(
                        w,
                        start=round(min(w.start + off, duration), 3),
                        end=round(min(w.end + off, duration), 3),
                    )
                    for w in seg.words
                ]
                segments.append(
                    replace(
                        seg,
                        id=len(segments),
                        start=round(min(seg.start + off, duration), 3),
                        end=round(min(seg.end + off, duration), 3),
                        seek=int(round(off * 100)),
                        words=words,
                    )
                )
        language = options.language or self._majority_language(windows, results)
        return Transcript(language=language, duration=duration, segments=segments, task=options.task)

    @staticmethod
    def _majority_language(windows: Sequence[Window], results: Sequence[WindowResult]) -> str:
        votes: Counter[str] = Counter()
        for w, r in zip(windows, results, strict=True):
            votes[r.language] += w.duration_s
        return votes.most_common(1)[0][0] if votes else "en"

    def transcribe_windows(self, windows: Sequence[Window]) -> list[WindowResult]:
        """Decode any windows in as few model calls as their options allow."""
        self.load()
        results: list[WindowResult | None] = [None] * len(windows)
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(windows):
            o = w.options
            # windows that differ only in word_timestamps still share one decoding batch
            groups.setdefault((o.task, o.language, o.initial_prompt, o.beam_size, o.temperature), []).append(i)
        with self._lock, torch.inference_mode():
            for idx in groups.values():
                for start in range(0, len(idx), self.max_batch_size):
                    chunk = idx[start : start + self.max_batch_size]
                    for i, r in zip(chunk, self._transcribe_group([windows[i] for i in chunk]), strict=True):
                        results[i] = r
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------- internals
    def _features(self, windows: Sequence[Window]) -> torch.Tensor:
        """Whisper's log-mel spectrogram of 30 s windows, computed batched on the model's device.

        Same arithmetic as WhisperFeatureExtractor (checked in tests), without its round trip
        through numpy per window, which on a GPU cost more than the encoder.
        """
        n = N_SAMPLES
        batch = np.zeros((len(windows), n), dtype=np.float32)
        for k, w in enumerate(windows):
            batch[k, : min(n, len(w.samples))] = w.samples[:n]
        audio = torch.from_numpy(batch).to(self.device)
        stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=self._hann, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        mel = self._mel_filters @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        return ((log_spec + 4.0) / 4.0).to(self._dtype)

    def _encode(self, windows: Sequence[Window]) -> torch.Tensor:
        features = self._features(windows)
        encoder = self.model.model.encoder
        if self.device != "cpu":
            return encoder(features).last_hidden_state
        # one window per call on CPU: 1500 frames already fill the cores, and dynamic int8
        # scales stay per window (see load)
        return torch.cat([encoder(f[None]).last_hidden_state for f in features])

    def _prompt_tokens(self, prompt: str | None) -> list[int]:
        if not prompt:
            return []
        ids = self.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False)
        return [self.sot_prev, *ids[-(MAX_NEW_TOKENS - 1) :]]

    def _detect_languages(self, enc: torch.Tensor) -> list[str]:
        ids = torch.full((enc.shape[0], 1), self.sot, device=self.device)
        logits = self._decoder_logits(ids, enc, cache=None)[:, -1]
        lang_ids = torch.tensor(list(self.lang_to_id.values()), device=self.device)
        best = logits[:, lang_ids].argmax(-1).tolist()
        names = list(self.lang_to_id)
        return [names[b] for b in best]

    def _decoder_logits(self, ids: torch.Tensor, enc: torch.Tensor, cache) -> torch.Tensor:
        out = self.model.model.decoder(
            input_ids=ids, encoder_hidden_states=enc, past_key_values=cache, use_cache=cache is not None
        )
        return self.model.proj_out(out.last_hidden_state).float()

    def _transcribe_group(self, windows: list[Window], depth: int = 0) -> list[WindowResult]:
        opts = windows[0].options
        enc = self._encode(windows)
        if self.is_multilingual:
            langs = [opts.language] * len(windows) if opts.language else self._detect_languages(enc)
        else:
            langs = ["en"] * len(windows)
        prefixes = [self._sot_sequence(lang, opts.task) for lang in langs]
        prompt = self._prompt_tokens(opts.initial_prompt)
        durations = [w.duration_s for w in windows]
        if opts.beam_size > 1:
            decoded = self._decode_beam(windows, prefixes, prompt, opts)
        else:
            decoded = self._decode_greedy(enc, prefixes, prompt, durations, opts.temperature)
            if not self.fixed_new_tokens:
                decoded = self._fallback(enc, prefixes, prompt, durations, decoded, opts.temperature)
        results = []
        for k, dec in enumerate(decoded):
            segments, probs = self._segments(dec, durations[k])
            if dec.no_speech_prob > NO_SPEECH_LIMIT and dec.avg_logprob < LOGPROB_LIMIT:
                segments, probs = [], []  # silence the model would fill with invented text
            results.append(WindowResult(language=langs[k], segments=segments, token_probs=probs))
        if depth < MAX_SKIP_RETRIES and not self.fixed_new_tokens:
            self._recover_skipped_speech(windows, results, depth)
        wanted = [k for k, w in enumerate(windows) if w.options.word_timestamps]
        if wanted:
            self._add_word_timestamps(enc, prefixes, results, windows, wanted)
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
        redone = self._transcribe_group([w for *_, w in retries], depth + 1)
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

        vocab = logits.shape[-1]
        tb = self.timestamp_begin
        suppress = torch.zeros(vocab, dtype=torch.bool, device=dev)
        suppress[[t for t in self.suppress if t < vocab]] = True
        suppress[self.no_timestamps] = True
        suppress[self.sot] = suppress[self.sot_prev] = suppress[self.no_speech] = True
        begin_suppress = suppress.clone()
        begin_suppress[self.begin_suppress] = True
        begin_suppress[:tb] = True  # the first token is a timestamp ...
        begin_suppress[tb + 51 :] = True  # ... of at most 1.0 s (max_initial_timestamp)
        vocab_idx = torch.arange(vocab, device=dev)
        # a timestamp past the end of the window's audio is never allowed
        last_ts = torch.tensor(
            [tb + min(int(round(d / TIME_PRECISION)), 1500) for d in durations], device=dev
        )
        too_late = vocab_idx[None, :] > last_ts[:, None]

        # Sampling (temperature fallback) is seeded per window from its encoder output, so a
        # window gets the same text whatever its batch-mates and however often it is sent.
        row_seeds = [_window_seed(enc[k], temperature) for k in range(batch)] if temperature > 0 else []
        n_steps = self.fixed_new_tokens or MAX_NEW_TOKENS
        if self.fixed_new_tokens:
            suppress[self.eot] = begin_suppress[self.eot] = True
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
        neg_inf = torch.tensor(float("-inf"), device=dev)
        is_ts = vocab_idx[None, :] >= tb
        is_text = vocab_idx[None, :] < self.eot

        for step in range(n_steps):
            mask = (begin_suppress if step == 0 else suppress)[None, :] | too_late
            if step > 0:
                # after a pair of timestamps (or one at the start) text must follow
                mask = mask | (last_was_ts & penult_was_ts)[:, None] & is_ts
                # after a single timestamp another timestamp or eot must follow
                closing = last_was_ts & ~penult_was_ts
                mask = mask | closing[:, None] & is_text
                # timestamps never go backwards; a closing one may be repeated once as the
                # next opening one, otherwise the next must be later
                min_ts = torch.where(closing, last_ts_value, last_ts_value + 1)
                mask = mask | is_ts & (vocab_idx[None, :] < min_ts[:, None])
            scores = logits.masked_fill(mask, float("-inf"))
            lp = torch.log_softmax(scores, dim=-1)
            # when timestamps together are likelier than any text token, emit a timestamp
            force_ts = torch.logsumexp(lp[:, tb:], dim=-1) > lp[:, :tb].max(dim=-1).values
            scores[:, :tb].masked_fill_(force_ts[:, None], float("-inf"))
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

    def _decode_beam(self, windows, prefixes, prompt, opts) -> list[_Decoded]:
        """Beam search through transformers' generate (optional, slower path)."""
        feats = self._features(windows)
        out = []
        for k in range(len(windows)):
            lang = None
            if self.is_multilingual:
                lang = next(n for n, i in self.lang_to_id.items() if i == prefixes[k][1])
            kwargs = dict(
                num_beams=opts.beam_size,
                return_timestamps=True,
                max_new_tokens=MAX_NEW_TOKENS,
            )
            if lang:
                kwargs.update(language=lang, task=opts.task)
            if prompt:
                kwargs["prompt_ids"] = torch.tensor(prompt[1:], device=self.device)
            ids = self.model.generate(feats[k : k + 1], **kwargs)
            seq = ids[0].tolist() if not hasattr(ids, "sequences") else ids.sequences[0].tolist()
            start = next((j for j, t in enumerate(seq) if t >= self.timestamp_begin), len(seq))
            toks = [t for t in seq[start:] if t != self.eot]
            out.append(_Decoded(tokens=toks, logprobs=[], no_speech_prob=0.0, temperature=0.0))
        return out

    def _segments(self, dec: _Decoded, duration: float) -> tuple[list[Segment], list[list[float]]]:
        """Split a window's tokens at timestamp tokens into segments (times relative), with
        the probability of each segment's text tokens."""
        tb = self.timestamp_begin
        segments: list[Segment] = []
        probs: list[list[float]] = []
        text_tokens: list[int] = []
        text_probs: list[float] = []
        start: float | None = None
        cr = _compression_ratio(self.tokenizer.decode(self._text_tokens(dec.tokens)))

        def close(end: float) -> None:
            nonlocal text_tokens, text_probs, start
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
                        avg_logprob=dec.avg_logprob,
                        compression_ratio=cr,
                        no_speech_prob=dec.no_speech_prob,
                        temperature=dec.temperature,
                    )
                )
            text_tokens, text_probs, start = [], [], None

        for i, t in enumerate(dec.tokens):
            if t >= tb:
                ts = (t - tb) * TIME_PRECISION
                if text_tokens:
                    close(ts)
                start = ts
            elif t < self.eot:
                text_tokens.append(t)
                text_probs.append(float(np.exp(dec.logprobs[i])) if i < len(dec.logprobs) else 1.0)
        if text_tokens:
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

        DTW puts the first token of a window at frame 0 and lets words swallow the pauses
        around them; as openai-whisper does, over-long words are trimmed to twice the median
        word duration and segment timestamps win where the words are implausible; then onsets
        that still fall in silence the VAD heard move to where the speech starts.
        """
        k = 0
        all_words: list[list[Word]] = []
        for seg, probs in zip(result.segments, result.token_probs or [[]] * len(result.segments), strict=True):
            words: list[Word] = []
            local = 0
            for word_text, n_tok in self._split_words(seg.tokens):
                t0, t1 = timings[k], timings[k + n_tok - 1]
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
        for seg, words in zip(result.segments, all_words, strict=True):
            if not words:
                continue
            for i, w in enumerate(words):
                if longest > 0 and w.end - w.start > longest:
                    if w.word.rstrip().endswith(_SENTENCE_END):
                        w.end = w.start + longest
                    elif i > 0 and words[i - 1].word.rstrip().endswith(_SENTENCE_END):
                        w.start = w.end - longest
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
            seg.start, seg.end = words[0].start, max(seg.end, words[-1].end)
            seg.words = words

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


__all__ = ["WhisperEngine", "Window", "WindowResult", "resolve_device"]
