#!/usr/bin/env bash
# Build the inputs of one GPU session (scripts/gpu/session.sh) from a clean checkout, on this machine's CPUs.
#   KIND=object bash scripts/gpu/make_inputs.sh    # .whl/, .gpu/init, .gpu/cache.xz  (about 50 min on 2 cores)
#   KIND=scene  bash scripts/gpu/make_inputs.sh    # .whl/, .gpu/scene_init, .gpu/scene_cache.xz
#   KIND=kernels bash scripts/gpu/make_inputs.sh   # .whl/ only
# COUNT, MAX_ASSETS, DATA, CACHE, INIT and WORKERS override the defaults below (a smoke test: COUNT=12 MAX_ASSETS=8
# and all three paths under /tmp). Each step is skipped when its output exists (rerun after a cut: `prepare` and `encode-dataset` resume too).
# Objects: the built-in model's own stream (train-default's configs/default.json: procedural objects of seed 1, 4096
# surface samples each; only 512 SDF queries, which the transformer does not read), the same ids and so the same
# hash splits: the held-out val and test objects stay out of the cache. Its first MAX_ASSETS training assets are
# packed (the 64 MiB upload limit; session.sh's header has the sums). Scenes: the stream session.sh's header names.
# Then: move src/moca3d/weights and candidates/ out of the tree and run KIND=... bash scripts/gpu/session.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIND=${KIND:-object}
WORKERS=${WORKERS:-2}
DATA=${DATA:-data/gpu_$KIND}
case "$KIND" in
  object) COUNT=${COUNT:-4300}; MAX_ASSETS=${MAX_ASSETS:-4000}; WEIGHTS=src/moca3d/weights/default
          CACHE=${CACHE:-.gpu/cache.xz}; INIT=${INIT:-.gpu/init}
          PREPARE=(--procedural objects --seed 1 --num-surface 4096 --num-queries 512) ;;
  scene)  COUNT=${COUNT:-1500}; MAX_ASSETS=${MAX_ASSETS:-1500}; WEIGHTS=src/moca3d/weights/scene
          CACHE=${CACHE:-.gpu/scene_cache.xz}; INIT=${INIT:-.gpu/scene_init}
          PREPARE=(--procedural scenes --seed 6 --scene-objects 2 32 --num-surface 4096 --num-queries 512) ;;
  kernels) ;;
  *) echo "KIND must be object, scene or kernels, got '$KIND'"; exit 2 ;;
esac
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

if ! ls .whl/*.whl >/dev/null 2>&1; then  # the packages the GPU image lacks, for its Python 3.12
  stamp "wheels -> .whl/"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 trimesh==5.2.0 rtree==1.4.1
fi
[ "$KIND" = kernels ] && { stamp "done: $(du -sh .whl | awk '{print $2, $1}')"; exit 0; }

if [ ! -f "$INIT/model_index.json" ]; then
  stamp "fp16 init -> $INIT"
  python3 scripts/gpu/assemble.py --export-init "$WEIGHTS" -o "$INIT"
fi
if [ ! -f "$CACHE" ]; then
  stamp "preparing $COUNT procedural ${KIND}s in $DATA ($WORKERS workers)"
  moca3d prepare "${PREPARE[@]}" --count "$COUNT" -o "$DATA" --workers "$WORKERS"
  stamp "encoding them with $WEIGHTS/vae"
  moca3d encode-dataset "$DATA" --model "$WEIGHTS/vae"
  stamp "caching the training split's latents"
  moca3d cache-latents "$DATA" -o "$DATA/train_cache.safetensors"
  stamp "packing its first $MAX_ASSETS assets -> $CACHE"
  mkdir -p "$(dirname "$CACHE")"
  python3 scripts/gpu/transport.py pack "$DATA/train_cache.safetensors" -o "$CACHE" --max-assets "$MAX_ASSETS"
fi
stamp "done: $(du -sh .whl "$INIT" "$CACHE" | awk '{printf "%s %s  ", $2, $1}')"
