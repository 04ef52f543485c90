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
# pip's configured index decides which build: a CPU wheel where it offers one (as on this project's CI
# machines); on stock PyPI set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"$PY" -m pip install -q -e ".[dev]"
# The web demo's browser test (tests/test_app.py) drives Debian's chromium; playwright's own
# browser download is never used. Without it that one test is skipped, with the reason.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"  # never prompt: fail and warn instead
  if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q \
         && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } >/dev/null; then
    echo "warning: could not install chromium with apt-get: the web demo's browser test will be skipped" >&2
  fi
fi
touch "$STAMP"
