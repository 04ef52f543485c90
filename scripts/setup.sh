#!/usr/bin/env bash
# One-time set-up of moca3d on a fresh Debian/Ubuntu machine (idempotent; fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.setup-done
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ] \
   && "$PY" -c "import moca3d, torch" 2>/dev/null; then
  exit 0
fi
# No system libraries are needed: rendering is CPU ray casting (trimesh + embreex wheels).
# torch first, so nothing else pulls a multi-GB CUDA build; keep a GPU build if one is present.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[dev]"
touch "$STAMP"
