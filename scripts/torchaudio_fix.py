"""Make `import torchaudio` work when its compiled extension does not match the installed torch.

Why: pyannote.audio imports torchaudio, but the registry's torchaudio wheel is built against CUDA
torch, so on a CPU-only torch its `_torchaudio*.so` fails to load (`libc10_cuda.so` missing) and
the whole import fails. pyannote's diarization path needs only torchaudio's pure-Python parts
(`torchaudio.compliance.kaldi`, ...). torchaudio itself treats a *missing* extension file as
"extension not available" and carries on, so the fix is to move that one file aside.

Rules this script keeps:
- a no-op where `import torchaudio` already works (e.g. a CUDA image with matching versions);
- prints every file it moves; `--undo` moves them back (reinstalling torchaudio does too);
- checks afterwards that torchaudio and `torchaudio.compliance.kaldi` import, and fails if not.

Usage: python scripts/torchaudio_fix.py [--undo] [--check]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

SUFFIX = ".disabled-cpu-torch"
"""Appended to a moved extension file; `--undo` strips it."""

PROBE = "import torchaudio, torchaudio.compliance.kaldi; print(torchaudio.__version__)"


def _probe() -> tuple[bool, str]:
    """Import torchaudio in a fresh interpreter (a failed import poisons this one)."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return done.returncode == 0, done.stdout.strip() if done.returncode == 0 else last


def _lib_dir() -> Path | None:
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def fix() -> int:
    ok, detail = _probe()
    if ok:
        print(f"torchaudio_fix: torchaudio {detail} imports fine; nothing to do")
        return 0
    lib = _lib_dir()
    if lib is None:
        print("torchaudio_fix: torchaudio is not installed; nothing to do")
        return 0
    print(f"torchaudio_fix: `import torchaudio` fails: {detail}")
    if "libc10_cuda" not in detail and "Could not load this library" not in detail:
        print("torchaudio_fix: not the CUDA-extension mismatch this script handles; leaving it")
        return 1
    for path in sorted(lib.glob("_torchaudio*.so")):
        target = path.with_name(path.name + SUFFIX)
        path.rename(target)
        print(f"torchaudio_fix: moved {path} -> {target.name} (undo: {Path(__file__).name} --undo)")
    ok, detail = _probe()
    if not ok:
        print(f"torchaudio_fix: torchaudio still fails to import: {detail}")
        return 1
    print(f"torchaudio_fix: torchaudio {detail} now imports (pure-Python parts; no C++ extension)")
    return 0


def undo() -> int:
    lib = _lib_dir()
    moved = sorted(lib.glob(f"*{SUFFIX}")) if lib else []
    if not moved:
        print("torchaudio_fix: nothing to undo")
    for path in moved:
        target = path.with_name(path.name[: -len(SUFFIX)])
        path.rename(target)
        print(f"torchaudio_fix: restored {target}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--undo", action="store_true", help="move the extension files back")
    parser.add_argument("--check", action="store_true", help="only report whether it imports")
    args = parser.parse_args()
    if args.undo:
        return undo()
    if args.check:
        ok, detail = _probe()
        print(f"torchaudio_fix: {'ok ' if ok else 'broken: '}{detail}")
        return 0 if ok else 1
    return fix()


if __name__ == "__main__":
    sys.exit(main())
