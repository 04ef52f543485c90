#!/usr/bin/env bash
# One GPU session of this project (device tool, H100/H200, ~10 minutes), as one prepared script.
# KIND=object (the default):
#   1. three trainings side by side on one GPU, the same cache and time limit (TRAINS, name:recipe:mode):
#      - cont:         the built-in model (.gpu/init: width 192, 8 blocks, 6 heads) trained further at batch 64
#                      (configs/dit_small_7k_pretrained_gpu_continue.json, named for an earlier small model: the
#                      shape comes from the init);
#      - medium_moc:   a transformer trained from scratch (configs/dit_medium_pretrained.json: width 192, 8 blocks,
#                      6 heads, the built-in model's shape) on the built-in model's pre-trained image encoder, MoCA attention;
#      - medium_dense: the same with dense-global attention (PartCrafter-style baseline);
#      each returns its EMA weights (fp16: the transformer and image encoder of its pipeline);
#   2. meanwhile, peak memory of one training step (benchmarks/memory.py, bf16, the model of benchmarks/forward_gpu.json:
#      L = 1024, C = 64, D = 2048, 16 heads, 8 blocks, cond_dim 1024);
#   3. then, alone on the GPU, the attention (L = 1024, D = 2048) and whole-forward (forward_gpu.json) benchmarks, bf16.
# KIND=scene (issue 7: image + instance masks -> one mesh per instance, up to 32):
#   1. two trainings side by side: the built-in scene model (.gpu/scene_init) trained further at batch 64
#      (configs/dit_scene_small_gpu_continue.json), scene_moc with MoCA and scene_dense with dense-global attention;
#   2. meanwhile, peak memory of one scene training step at 32 instances, MoCA vs dense at the same batch
#      (per-instance conditions): the scene transformer's size at batch 8 and 64, then the scene transformer at
#      forward_gpu.json's size (its config, then forward_gpu.json's keys over it) at batch 1, 2 (with auto, then fused);
#   3. left out by default (BENCH=memory): its timeouts (130 + 80 s) after those of the memory runs (150 + 130 + 100 s,
#      from the start) add up to more than the 600 s a command may run; BENCH=1 adds it (the object session measures it).
# KIND=kernels (no training; inputs: the tree and .whl/; its timeouts add up to 500 s): the `fused` backend's Triton kernels against
#   the others, first their peak memory of one training step at forward_gpu.json's size (auto = `reference`, then `fused`),
#   then the attention benchmark (reference, matmul, fused; forward and forward+backward) and the whole forward
#   with auto and with fused. Its result files end in _kernels (attention_cuda_kernels.json, ...), so that they can sit
#   in benchmarks/results/ beside the object session's.
# Inputs, carried next to the working tree: .whl/ (wheels of packages the GPU image lacks), CACHE
# (scripts/gpu/transport.py pack of `moca3d cache-latents` of the training split: .gpu/cache.xz, .gpu/scene_cache.xz)
# and INIT (a built-in pipeline with fp16 weights, scripts/gpu/assemble.py --export-init: .gpu/init, .gpu/scene_init;
# the recipes name it as their init_from / image_encoder_from, every run takes its VAE).
# Everything comes back under $OUT (at most 8 files): <name>.tar, results.tar, session.log.
#
# Making the inputs here (both folders are git-ignored: /.whl/ and /.gpu/ in .gitignore): KIND=... bash
# scripts/gpu/make_inputs.sh runs the commands below from a clean checkout (objects: about 50 min on 2 cores). The upload limit is 64 MiB
# in all (MiB = 2^20 bytes), so move src/moca3d/weights and candidates/ out of the tree for the run (git checkout
# brings them back; the session needs only INIT). Sizes, measured on 2026-12-03 unless said otherwise:
#   the tree without them 6.8 MiB (git ls-files -co --exclude-standard; it grows with benchmarks/results/);
#   the wheels 7.3 MiB (diffusers 6.1, trimesh 0.7, rtree 0.5; importlib_metadata is not among them: diffusers
#   requires it but on Python >= 3.8 imports the standard library's importlib.metadata);
#   .gpu/init 13.6 MiB (the built-in transformer of width 192, 8 blocks, in fp16); .gpu/scene_init 6.1 MiB.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 trimesh==5.2.0 rtree==1.4.1
#   objects (the cache not measured here: packed, 6 200 objects took 46.8 MiB, 7.7 KiB each (docs/RESULTS.md), so
#   4 000 take about 30.2 MiB if the first ones pack like the average; with the init, wheels and tree about 57.8 MiB
#   of the 64 (6 200 objects: 74.4); a cache over about 36 MiB does not fit, so check the size pack prints):
#   moca3d cache-latents data/objects -o data/objects_train_cache.safetensors   # after encode-dataset
#   python3 scripts/gpu/transport.py pack data/objects_train_cache.safetensors -o .gpu/cache.xz --max-assets 4000
#   python3 scripts/gpu/assemble.py --export-init src/moca3d/weights/default -o .gpu/init
#   KIND=object bash scripts/gpu/session.sh
#   scenes (1 361 training scenes of 2-32 instances, 17 KiB each packed: 22.4 MiB, as packed before and not measured
#   here; with the scene init, the wheels and the tree about 42.6 MiB of the 64):
#   moca3d prepare --procedural scenes --count 1500 --seed 6 --scene-objects 2 32 --num-surface 4096 --num-queries 512 \
#     -o data/scenes_s6 --workers 2
#   moca3d encode-dataset data/scenes_s6
#   moca3d cache-latents data/scenes_s6 -o data/scenes_s6_train_cache.safetensors   # scenes: with their instance masks
#   python3 scripts/gpu/transport.py pack data/scenes_s6_train_cache.safetensors -o .gpu/scene_cache.xz
#   python3 scripts/gpu/assemble.py --export-init src/moca3d/weights/scene -o .gpu/scene_init
#   KIND=scene bash scripts/gpu/session.sh   # BENCH=memory by default: without stage 3
#   kernels: only the wheels; KIND=kernels bash scripts/gpu/session.sh
# Back here: python3 scripts/gpu/assemble.py cont.tar --vae src/moca3d/weights/default/vae -o runs/gpu/cont/pipeline
#   (scenes: scene_moc.tar --vae src/moca3d/weights/scene/vae -o runs/gpu/scene_moc/pipeline)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/moca3d-gpu-out}
WORK=${WORK:-/tmp/moca3d-gpu}
TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-240}      # training seconds per run (the runs go at once)
STEPS=${STEPS:-}                         # override the recipe's steps (smoke tests)
BATCH=${BATCH:-}                         # override the recipe's batch size (smoke tests on a CPU: NO_WHEELS=1 DEVICE=cpu)
KIND=${KIND:-object}                     # object, scene or kernels: the defaults of TRAINS, CACHE, INIT and BENCH, and the benchmarks
if [ "$KIND" = scene ]; then
  TRAINS=${TRAINS:-"scene_moc:configs/dit_scene_small_gpu_continue.json:moc scene_dense:configs/dit_scene_small_gpu_continue.json:dense"}
  CACHE=${CACHE:-.gpu/scene_cache.xz}
  INIT=${INIT:-.gpu/scene_init}
  BENCH=${BENCH:-memory}                 # stage 3 after the memory runs would pass 600 s
elif [ "$KIND" = object ]; then
  TRAINS=${TRAINS:-"cont:configs/dit_small_7k_pretrained_gpu_continue.json:moc medium_moc:configs/dit_medium_pretrained.json:moc medium_dense:configs/dit_medium_pretrained.json:dense"}
  CACHE=${CACHE:-.gpu/cache.xz}
  INIT=${INIT:-.gpu/init}
elif [ "$KIND" = kernels ]; then
  TRAINS=${TRAINS:-}
else
  echo "KIND must be object, scene or kernels, got '$KIND'"; exit 2
fi
DEVICE=${DEVICE:-cuda}
BENCH=${BENCH:-1}                        # 1: the memory benchmark beside the trainings, then stage 3; memory: the first only; 0: none
tag=""                                   # the result files' suffix: the kernels session's sit beside the object session's
[ "$KIND" = kernels ] && tag=_kernels
paper=benchmarks/forward_gpu.json        # the paper's size (memory and forward): L = 1024, C = 64, D = 2048, 16 heads, 8 blocks, cond_dim 1024
mkdir -p "$OUT" "$WORK/results"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
save_results() { tar -cf "$OUT/results.tar" -C "$WORK" results; }  # again after each stage: a kill keeps what is done

if [ -z "${NO_WHEELS:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
else
  export PYTHONPATH=$PWD/src:$PWD/benchmarks
fi
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'python', sys.version.split()[0])"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

if [ -n "$TRAINS" ]; then
  stamp "unpacking the latent cache"
  python3 scripts/gpu/transport.py unpack "$CACHE" -o "$WORK/cache.safetensors" || exit 1
fi

# 1. the trainings at once (each under a hard wall-clock limit too, should one hang)
pids=()
names=()
for spec in $TRAINS; do
  IFS=: read -r v recipe mode <<< "$spec"
  names+=("$v")
  stamp "training $v ($recipe, $mode)"
  timeout $((TRAIN_LIMIT_S + 100)) python3 -m moca3d train "$WORK/cache.safetensors" -o "$WORK/runs/$v" --config "$recipe" \
    --attention-mode "$mode" --time-limit "$TRAIN_LIMIT_S" ${STEPS:+--steps "$STEPS"} ${BATCH:+--batch-size "$BATCH"} \
    --vae "$INIT/vae" --device "$DEVICE" > "$WORK/results/train_$v.log" 2>&1 &
  pids+=($!)
done

# 2. meanwhile: memory of one training step (measured per process: the trainings do not change it)
#    (scenes: the scene transformer's config from INIT, each component conditioned on its own instance)
memory() {  # NAME SECONDS, then memory.py's arguments: one run under that limit, its records in results/NAME$tag.json
  local name=$1$tag seconds=$2; shift 2  # (the file is rewritten after each record: a timeout keeps those done)
  timeout "$seconds" python3 benchmarks/memory.py --device cuda --dtype bf16 "$@" --json "$WORK/results/$name.json" > "$WORK/results/$name.txt" 2>&1
}
if [ "$BENCH" != 0 ] && [ "$DEVICE" = cuda ]; then
  stamp "memory benchmark (background)"
  if [ "$KIND" = kernels ]; then
    { memory memory_cuda_auto 110 --config "$paper" --n 8 32 --batch 1 2
      memory memory_cuda_fused 110 --config "$paper" --n 8 32 --batch 1 2 --backend fused; } &
  elif [ "$KIND" = scene ]; then
    scene="$INIT/transformer/config.json"  # at the paper's size: its config, then forward_gpu.json's keys over it
    { memory memory_scene_cuda 150 --config "$scene" --scene --n 32 --batch 8 64 --sdpa auto math
      memory memory_scene_cuda_l1024 130 --config "$scene" "$paper" --scene --n 32 --batch 1 2
      memory memory_scene_cuda_l1024_fused 100 --config "$scene" "$paper" --scene --n 32 --batch 1 2 --backend fused; } &
  else
    memory memory_cuda 280 --config "$paper" --n 8 16 32 --batch 1 2 &
  fi
  mem_pid=$!
fi
for p in "${pids[@]}"; do wait "$p"; done
stamp "trainings finished"
for v in "${names[@]}"; do tail -n 3 "$WORK/results/train_$v.log"; cp "$WORK/runs/$v/train_log.jsonl" "$WORK/results/train_log_$v.jsonl" 2>/dev/null; cp "$WORK/runs/$v/train_config.json" "$WORK/results/train_config_$v.json" 2>/dev/null; done

# weights back in fp16 (one tar per variant, < 16 MiB)
for v in "${names[@]}"; do
  [ -f "$WORK/runs/$v/pipeline/model_index.json" ] || { echo "no pipeline for $v"; continue; }
  python3 - "$WORK/runs/$v/pipeline" "$WORK/export_$v" <<'PY'
import sys
from pathlib import Path
from moca3d.models.image_encoder import ImageEncoder
from moca3d.models.transformer import MoCATransformer
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for name, klass in (("transformer", MoCATransformer), ("image_encoder", ImageEncoder)):
    klass.from_pretrained(src / name).half().save_pretrained(dst / name)
PY
  tar -cf "$OUT/$v.tar" -C "$WORK/export_$v" transformer image_encoder && ls -la "$OUT/$v.tar"
done
save_results
[ -n "${mem_pid:-}" ] && { stamp "waiting for the memory benchmark"; wait "$mem_pid"; save_results; }

# 3. alone on the GPU: attention and forward timings
if [ "$BENCH" = 1 ] && [ "$DEVICE" = cuda ]; then
  stamp "attention benchmark"
  backends="reference chunked blocksparse matmul"  # fused: compiled on first use, measured on its own in KIND=kernels
  [ "$KIND" = kernels ] && backends="reference matmul fused"
  timeout 130 python3 benchmarks/attention.py --n 8 16 32 --backends $backends --json "$WORK/results/attention_cuda$tag.json" 2>&1 | tee "$WORK/results/attention_cuda$tag.txt"
  save_results
  stamp "forward benchmark"
  timeout 80 python3 benchmarks/forward.py --n 8 16 32 --config "$paper" --json "$WORK/results/forward_cuda$tag.json" 2>&1 | tee "$WORK/results/forward_cuda$tag.txt"
  if [ "$KIND" = kernels ]; then
    save_results
    stamp "forward benchmark, fused backend"
    timeout 70 python3 benchmarks/forward.py --n 8 16 32 --config "$paper" --backend fused \
      --json "$WORK/results/forward_cuda_fused$tag.json" 2>&1 | tee "$WORK/results/forward_cuda_fused$tag.txt"
  fi
fi
stamp "done"
save_results
