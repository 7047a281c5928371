#!/usr/bin/env bash
# Download (on a machine WITH network) the wheels that benchmarks/gpu.sh installs on a GPU machine without one.
#
#   benchmarks/fetch_wheels.sh DIR [PYTHON_VERSION]     # default DIR=.whl, PYTHON_VERSION=3.12
#
# Fetches, for CPython PYTHON_VERSION on manylinux x86-64, the pinned versions (constraints.txt) of what a
# typical GPU image lacks or holds at another version: diffusers and its small dependencies
# importlib_metadata, lazy-importer and zipp, the tested transformers and peft (an image's transformers
# 5.17 is not what the suite ran with), plus dlib-bin for the align benchmark (which also needs
# face_recognition_models, ~100 MB; fetch it yourself if you want align there). gpu.sh installs only the
# wheels whose version that Python does not already have.
set -euo pipefail
DIR=${1:-.whl}
PYVER=${2:-3.12}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
pin() { grep -i "^$1==" "$ROOT/constraints.txt" | head -1; }
mkdir -p "$DIR"
PURE=("$(pin diffusers)" "$(pin importlib_metadata)" "$(pin lazy-importer)" "$(pin zipp)" "$(pin transformers)" "$(pin peft)")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform any -d "$DIR" "${PURE[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "$(pin dlib-bin)" || echo "dlib-bin: no wheel for this platform; the align benchmark will be skipped." >&2
ls -l "$DIR"
