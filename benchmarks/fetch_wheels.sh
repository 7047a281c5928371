#!/usr/bin/env bash
# Download (on a machine WITH network) the wheels that benchmarks/gpu.sh installs on a GPU machine without one.
#
#   benchmarks/fetch_wheels.sh DIR [PYTHON_VERSION]     # default DIR=.whl, PYTHON_VERSION=3.12
#
# Fetches, for CPython PYTHON_VERSION on manylinux x86-64, the pinned versions (constraints.txt) of what a
# typical GPU image lacks: diffusers and its small dependencies importlib_metadata, lazy-importer and zipp
# (gpu.sh installs only those the GPU's Python does not have), plus dlib-bin for the align benchmark
# (the align benchmark also needs face_recognition_models, ~100 MB; fetch it yourself if you want align there).
set -euo pipefail
DIR=${1:-.whl}
PYVER=${2:-3.12}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
pin() { grep -i "^$1==" "$ROOT/constraints.txt" | head -1; }
mkdir -p "$DIR"
PURE=("$(pin diffusers)" "$(pin importlib_metadata)" "$(pin lazy-importer)" "$(pin zipp)")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform any -d "$DIR" "${PURE[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "$(pin dlib-bin)" || echo "dlib-bin: no wheel for this platform; the align benchmark will be skipped." >&2
ls -l "$DIR"
