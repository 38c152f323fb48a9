"""Speaker diarization: pyannote segmentation-3.0 + CAM++ embeddings + per-file clustering."""

from speech.diarization.engine import DiarizationEngine, validate_hints

__all__ = ["DiarizationEngine", "validate_hints"]
