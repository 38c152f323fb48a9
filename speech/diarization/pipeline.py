"""pyannote's `SpeakerDiarization`, assembled from local checkpoints and made cheaper on CPU.

pyannote's `apply()` is kept as is (segmentation -> speaker count -> embeddings -> clustering ->
reconstruction). What changes:
- no PLDA / hub download: the constructor wires a local segmentation model, CAM++ and our
  clustering instead of resolving hub names;
- embeddings: pyannote runs the embedding model once per (chunk, local speaker) with the same
  waveform and a different mask; CAM++'s masks only enter at pooling, so we run the backbone
  once per chunk (batched) and pool once per active speaker: a third of the work, same numbers;
- a small cache of (segmentation, embeddings) per audio, so asking again with other speaker
  hints only re-runs clustering;
- the instantaneous speaker count: pyannote rounds the share of overlapping windows that hear
  each speaker with `np.rint` (half to even: 0.5 -> 0, 2.5 -> 2); we count speech from
  `speech_onset` and round overlap half up (figures in docs/diarization.md).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pyannote.audio import Audio, Inference, Model
from pyannote.audio import Pipeline as AudioPipeline
from pyannote.audio.pipelines import SpeakerDiarization
from pyannote.core import SlidingWindowFeature
from pyannote.pipeline.parameter import ParamDict, Uniform

from speech.diarization.clustering import ClusteringParams, SpeakerClustering
from speech.diarization.embedding import CamPlusPlus


@dataclass(frozen=True)
class PipelineParams:
    """Knobs of the offline pipeline (tuned figures in docs/diarization.md)."""

    segmentation_step: float = 0.2
    """Hop between 10 s segmentation windows, as a share of the window (pyannote's default 0.1)."""
    embedding_exclude_overlap: bool = True
    """Pool each speaker's embedding over frames where they speak alone, when there are enough."""
    min_duration_off: float = 1.25
    """Gaps shorter than this inside one speaker's speech are filled."""
    speech_onset: float = 0.4
    """A frame has at least one speaker when this share of the windows covering it hear one
    (pyannote: more than half). The windows disagree most at turn edges and short turns."""
    embedding_context: str = "block"
    """"chunk": CAM++ sees each 10 s window alone, as pyannote does (each second of audio runs
    through the backbone 1/segmentation_step times); "block": the backbone runs once over the file
    in `block_s` blocks and each window pools its own slice of those frames (5x less work at
    step 0.2; see docs/diarization.md for what it costs in DER)."""
    block_s: float = 30.0
    block_margin_s: float = 2.0
    """Context on each side of a block, computed and thrown away, so block edges see both ways."""
    embedding_batch_size: int = 16
    segmentation_batch_size: int = 32
    cache_size: int = 4
    """How many recent audios keep their segmentation and embeddings."""
    clustering: ClusteringParams = ClusteringParams()


def audio_key(waveform: torch.Tensor) -> str:
    """Content hash of a waveform: the cache key for its segmentation and embeddings."""
    return hashlib.blake2b(waveform.numpy().tobytes(), digest_size=16).hexdigest()


class OfflineSpeakerDiarization(SpeakerDiarization):
    """segmentation-3.0 + CAM++ + `SpeakerClustering`, all from local files."""

    def __init__(self, segmentation: Model, embedding: CamPlusPlus, params: PipelineParams) -> None:
        # SpeakerDiarization.__init__ resolves hub names and a PLDA we do not have: set up the
        # same attributes that its `apply()` reads, from local objects.
        AudioPipeline.__init__(self)
        self.legacy = False
        self.params = params
        self.segmentation_model = segmentation
        self.segmentation_step = params.segmentation_step
        self.embedding = embedding
        self.embedding_batch_size = params.embedding_batch_size
        self.embedding_exclude_overlap = params.embedding_exclude_overlap
        self.klustering = "SpeakerClustering"
        self.der_variant = {"collar": 0.0, "skip_overlap": False}
        duration = segmentation.specifications.duration
        self._segmentation = Inference(
            segmentation,
            duration=duration,
            step=params.segmentation_step * duration,
            skip_aggregation=True,
            batch_size=params.segmentation_batch_size,
        )
        self.segmentation = ParamDict(min_duration_off=Uniform(0.0, 1.0))
        self._embedding = embedding.eval()
        self._audio = Audio(sample_rate=16_000, mono="downmix")
        self.clustering = SpeakerClustering(params.clustering)
        self._expects_num_speakers = False
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.timings: dict[str, float] = {}
        """Seconds of the last call's model steps (0 when served from the cache), for bench/."""
        self.instantiate({"segmentation": {"min_duration_off": params.min_duration_off}})

    def speaker_count(  # type: ignore[override]
        self, binarized_segmentations: SlidingWindowFeature, frames: Any, warm_up: tuple[float, float] = (0.1, 0.1)
    ) -> SlidingWindowFeature:
        """Frame-level speaker count: speech from `speech_onset`, overlap rounded half up."""
        trimmed = Inference.trim(binarized_segmentations, warm_up=warm_up)
        count = Inference.aggregate(
            np.sum(trimmed, axis=-1, keepdims=True), frames, hamming=False, missing=0.0, skip_average=False
        )
        mean = count.data
        speakers = np.where(mean >= 1.0, np.floor(mean + 0.5), mean >= self.params.speech_onset)
        count.data = speakers.astype(np.uint8)
        return count

    def to(self, device: torch.device) -> OfflineSpeakerDiarization:
        self._segmentation.to(device)
        self._embedding.to(device)
        self.device = device
        return self

    def _cached(self, file: dict[str, Any]) -> dict[str, Any]:
        key = file.setdefault("audio_key", audio_key(file["waveform"]))
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = {}
            while len(self._cache) > self.params.cache_size:
                self._cache.popitem(last=False)
        return self._cache[key]

    def get_segmentations(self, file, hook=None) -> SlidingWindowFeature:  # type: ignore[override]
        cache = self._cached(file)
        started = time.perf_counter()
        if "segmentations" not in cache:
            cache["segmentations"] = super().get_segmentations(file, hook=hook)
        self.timings = {"segmentation_s": time.perf_counter() - started}
        return cache["segmentations"]

    def get_embeddings(  # type: ignore[override]
        self, file, binary_segmentations: SlidingWindowFeature, exclude_overlap: bool = False, hook=None
    ) -> np.ndarray:
        """(num_chunks, local_speakers, 192) embeddings; NaN where a local speaker is silent."""
        cache = self._cached(file)
        started = time.perf_counter()
        if "embeddings" not in cache:
            cache["embeddings"] = self._compute_embeddings(file, binary_segmentations, exclude_overlap)
        self.timings["embeddings_s"] = time.perf_counter() - started
        return cache["embeddings"]

    def _compute_embeddings(
        self, file: dict[str, Any], segmentations: SlidingWindowFeature, exclude_overlap: bool
    ) -> np.ndarray:
        masks, active = _pooling_masks(segmentations, exclude_overlap)
        if self.params.embedding_context == "block":
            return self._block_embeddings(file, segmentations, masks, active)
        return self._chunk_embeddings(file, segmentations, masks, active)

    def _block_embeddings(
        self, file: dict[str, Any], segmentations: SlidingWindowFeature, masks: np.ndarray, active: np.ndarray
    ) -> np.ndarray:
        """Backbone once over the file; each (chunk, speaker) pools its slice of the frames."""
        model = self._embedding
        device = next(model.parameters()).device
        waveform, sr = file["waveform"][0], file["sample_rate"]
        window = segmentations.sliding_window
        frames = _frame_features(model, waveform, sr, self.params.block_s, self.params.block_margin_s, device)
        # frames: (512, total_frames) at FRAME_S resolution
        per_chunk = int(round(window.duration / FRAME_S))
        last_start = int(round(window[len(masks) - 1].start / FRAME_S))
        frames = torch.nn.functional.pad(frames, (0, max(0, last_start + per_chunk - frames.shape[1])))
        embeddings = np.full((*active.shape, model.dimension), np.nan, np.float32)
        chunk_idx, speaker_idx = np.nonzero(active)
        for start in range(0, len(chunk_idx), 64):
            cs, ss = chunk_idx[start : start + 64], speaker_idx[start : start + 64]
            offsets = [int(round(window[c].start / FRAME_S)) for c in cs]
            batch = torch.stack([frames[:, o : o + per_chunk] for o in offsets])
            # batch: (pairs, 512, per_chunk)
            weights = torch.from_numpy(masks[cs, :, ss]).to(device)
            with torch.inference_mode():
                embeddings[cs, ss] = model.pool(batch, weights).cpu().numpy()
        return embeddings

    def _chunk_embeddings(
        self, file: dict[str, Any], segmentations: SlidingWindowFeature, masks: np.ndarray, active: np.ndarray
    ) -> np.ndarray:
        """pyannote's way: the backbone sees each 10 s window alone (once per chunk, not per speaker)."""
        num_chunks, num_speakers = active.shape
        embeddings = np.full((num_chunks, num_speakers, self._embedding.dimension), np.nan, np.float32)
        waveform = file["waveform"][0]
        sr = file["sample_rate"]
        window = segmentations.sliding_window
        num_samples = int(round(window.duration * sr))
        todo = np.flatnonzero(active.any(axis=1))
        device = next(self._embedding.parameters()).device
        for start in range(0, len(todo), self.params.embedding_batch_size):
            chunks = todo[start : start + self.params.embedding_batch_size]
            batch = torch.zeros(len(chunks), 1, num_samples)
            for i, c in enumerate(chunks):
                offset = int(round(window[c].start * sr))
                piece = waveform[offset : offset + num_samples]
                batch[i, 0, : piece.shape[0]] = piece
            with torch.inference_mode():
                features = self._embedding.frame_features(batch.to(device))
                # features: (batch, 512, frames)
                rows, speakers = np.nonzero(active[chunks])
                weights = torch.from_numpy(masks[chunks[rows], :, speakers]).to(device)
                pooled = self._embedding.pool(features[torch.from_numpy(rows).to(device)], weights)
            embeddings[chunks[rows], speakers] = pooled.cpu().numpy()
        return embeddings


FRAME_S = 0.02
"""CAM++ backbone frame hop: 10 ms fbank frames, halved by its strided TDNN layer."""


def _pooling_masks(segmentations: SlidingWindowFeature, exclude_overlap: bool) -> tuple[np.ndarray, np.ndarray]:
    """(chunks, frames, speakers) pooling weights and (chunks, speakers) "speaks at all"."""
    masks = np.nan_to_num(segmentations.data, nan=0.0).astype(np.float32)
    if exclude_overlap:
        alone = masks * (masks.sum(axis=2, keepdims=True) < 2)
        enough = alone.sum(axis=1, keepdims=True) > 0.05 * masks.shape[1]
        masks = np.where(enough, alone, masks)
    return masks, masks.sum(axis=1) > 0


def _frame_features(
    model: CamPlusPlus, waveform: torch.Tensor, sr: int, block_s: float, margin_s: float, device: torch.device
) -> torch.Tensor:
    """CAM++ pre-pooling frames for the whole waveform, (512, ceil(len / FRAME_S)), in blocks."""
    hop = int(round(FRAME_S * sr))
    block, margin = int(block_s * sr) // hop * hop, int(margin_s * sr) // hop * hop
    total = -(-waveform.shape[0] // hop)
    out = torch.zeros(512, total)
    with torch.inference_mode():
        for start in range(0, waveform.shape[0], block):
            lo = max(0, start - margin)
            piece = waveform[lo : start + block + margin]
            if piece.shape[0] < 400:  # shorter than one fbank window
                piece = torch.nn.functional.pad(piece, (0, 400 - piece.shape[0]))
            feats = model.frame_features(piece[None, None].to(device))[0].cpu()
            first = (start - lo) // hop
            keep = feats[:, first : first + block // hop]
            out[:, start // hop : start // hop + keep.shape[1]] = keep[:, : total - start // hop]
    return out
