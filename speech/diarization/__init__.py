"""Speaker diarization: pyannote segmentation-3.0 + CAM++ embeddings + per-file clustering."""

from speech.diarization.engine import DiarizationEngine, load_diarizer
from speech.request import validate_hints

__all__ = ["DiarizationEngine", "load_diarizer", "validate_hints"]
