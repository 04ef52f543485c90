"""Benchmark: peak memory of one training step of the whole MoCA transformer vs the dense-global baseline.

For each N, batch size and attention mode ("moc" shown as moca, and "dense") one measurement runs
in its own process: it builds the transformer and the inputs of one rectified-flow step (latents
(B, N, L, C), timesteps, condition tokens, an all-real component mask), takes a baseline, runs
forward + flow loss + backward once in training mode (sampled routing), and reports the peak
increase over the baseline: activations, autograd buffers and the parameter gradients; weights,
inputs and optimizer state are not in it (weights and inputs are `static`, counted exactly).

Method. One warm-up step comes first (--warmup): full size on CUDA, so that the compiled
attention kernels and cuBLAS workspaces exist before the baseline; on the CPU one sample of at
most 4 components, which pages in torch's code (~20 MB of RSS that is not the step's). CUDA:
torch.cuda.reset_peak_memory_stats, then max_memory_allocated - memory_allocated. CPU: torch's
CPU allocations are not tracked by torch.cuda, so the kernel's peak resident set size is used:
glibc's mmap threshold fixed (a freed tensor leaves the RSS), heap trimmed (malloc_trim), baseline =
RSS, peak RSS reset by writing "5" to /proc/self/clear_refs, peak = VmHWM of /proc/self/status after
the step (a polled RSS where the reset is not allowed; benchkit.measure_peak). Checked: doubling the
batch doubles the delta (x1.98-2.00 on the CPU; docs/RESULTS.md), and a known allocation measures its
size (tests).

--sdpa math forces torch's math attention kernel in both modes (the score matrices are stored,
as without a fused kernel); the default lets torch pick its fused kernels, which keep none.
--scene conditions each component on its own tokens (B, N, T_c, cond_dim), as a scene training step
does (one 7-channel stack per instance), instead of one shared (B, T_c, cond_dim) per sample; the image
encoder's own step is not in the measurement.

The processes are forked, one per measurement, from a server process that imported torch and
moca3d but allocated no tensors and touched no GPU, so no allocator state leaks between
measurements and the ~4 s import is paid once. --budget-gib X marks which steps fit in X GiB
(static + peak); --max-batch also searches the largest batch that fits (doubling, then bisecting,
one process per probe; a probe stops as soon as it passes the budget). --json is rewritten (atomically) after every
record, so a run stopped by a timeout keeps what it measured.

    python benchmarks/memory.py --n 8 16 32 --batch 1 2 --threads 1 --json benchmarks/results/memory_cpu.json
    python benchmarks/memory.py --n 8 16 32 --batch 1 --sdpa math --threads 1 --json benchmarks/results/memory_cpu_math.json
    python benchmarks/memory.py --device cuda --dtype bf16 --config benchmarks/forward_gpu.json \\
        --n 8 16 32 --batch 4 --budget-gib 80 --max-batch --json benchmarks/results/memory_cuda.json
    python benchmarks/memory.py --config src/moca3d/weights/scene/transformer/config.json --scene --device cuda --dtype bf16 \\
        --n 32 --batch 8 64 --sdpa auto math --json benchmarks/results/memory_scene_cuda.json
    # the scene transformer at forward_gpu.json's size (L = 1024, C = 64, D = 2048, 16 heads, 8 blocks, cond_dim 1024):
    python benchmarks/memory.py --config src/moca3d/weights/scene/transformer/config.json benchmarks/forward_gpu.json --scene \\
        --device cuda --dtype bf16 --n 32 --batch 1 2 --json benchmarks/results/memory_scene_cuda_l1024.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moca3d.attention.config import BACKENDS
from moca3d.models.transformer import MoCATransformer

from benchkit import GIB, flow_training_step, load_config, measure_peak, positive_int, print_table, reset_peak_rss, rss_bytes, run_script, trim_heap, write_json  # benchmarks/benchkit.py

MODES = {"moc": "moca", "dense": "dense"}  # attention_mode -> name in the records, measured in this order
SDPA_CHOICES = ("auto", "math")  # torch's fused kernels (no score matrix kept), or the math kernel (scores materialised)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DEFAULT_N = [8, 16, 32]
DEFAULT_K_FRACTION = 0.25
WARMUP_STEPS = 1  # steps before the baseline: full size on CUDA, WARMUP_N_CPU components of one sample on the CPU
WARMUP_N_CPU = 4
DEFAULT_MAX_BATCH_CAP = 32  # the batch search stops doubling here
SAFETY_FRACTION = 0.8  # a CPU measurement stops when it would take more than this part of MemAvailable
WATCH_PERIOD_S = 0.005  # RSS polling period of the CPU budget watchdog
EXIT_OVER_LIMIT = 3  # exit status of a measurement stopped by its memory limit
SEED = 0


# ---------------------------------------------------------------- measurement (in the forked process)


def _watch_rss(limit_rss: int) -> None:
    """Exit the process with EXIT_OVER_LIMIT as soon as its RSS passes `limit_rss` bytes (a daemon thread)."""

    def watch() -> None:
        while rss_bytes() <= limit_rss:
            time.sleep(WATCH_PERIOD_S)
        os._exit(EXIT_OVER_LIMIT)

    threading.Thread(target=watch, daemon=True).start()


def measure(spec: Dict) -> Dict:
    """One training step of the spec's transformer: static bytes (weights + inputs), baseline and peak bytes."""
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    torch.set_num_threads(spec["threads"])
    limit = spec.get("limit_bytes")
    if device.type == "cuda" and limit:
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / torch.cuda.get_device_properties(device).total_memory), device)
    store = torch.float32 if spec["amp"] else dtype  # weights and inputs; --amp computes in `dtype` under autocast
    config, B, N = spec["config"], spec["batch"], spec["n"]
    torch.manual_seed(SEED)
    with torch.device(device):  # initialised where it runs: forward_gpu.json's 593M parameters take 13 s on 2 CPU cores
        model = MoCATransformer(**{**config, "attention_mode": spec["mode"]})
    torch.nn.Module.to(model, device, store).train()  # plain cast (diffusers warns on .to(dtype)); training = sampled routing
    model.gradient_checkpointing = spec["grad_checkpointing"]
    step, inputs = flow_training_step(model, B, N, device, store, scene=spec["scene"], seed=SEED,
                                      autocast=dtype if spec["amp"] else None)

    warm_b, warm_n = (B, N) if device.type == "cuda" else (1, min(N, WARMUP_N_CPU))
    with sdpa_kernel(SDPBackend.MATH) if spec["sdpa"] == "math" else nullcontext():
        for _ in range(spec["warmup"]):
            step(warm_b, warm_n)
            model.zero_grad(set_to_none=True)
        tensors = list(model.parameters()) + inputs
        static = sum(x.numel() * x.element_size() for x in tensors)
        if device.type == "cpu" and limit:
            trim_heap()
            _watch_rss(rss_bytes() + limit - static)
        base, peak = measure_peak(step, device)
    if device.type == "cuda":
        method = f"cuda max_memory_allocated ({torch.cuda.get_device_name(device)})"
    else:
        method = "cpu VmHWM after clear_refs" if reset_peak_rss() else "cpu RSS polled"
    return {"static_bytes": static, "baseline_bytes": base, "peak_bytes": peak, "params": sum(p.numel() for p in model.parameters()), "method": method}


def _run_forked(spec: Dict) -> Dict:
    """measure(spec) in a forked child; its result, or over_limit / error from how it ended."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: stdout belongs to the server's protocol, so send prints to stderr
        os.close(read_fd)
        os.dup2(2, 1)
        result = measure_one(spec)
        code = 1 if "error" in result else 0
        with os.fdopen(write_fd, "w") as f:
            f.write(json.dumps(result))
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        text = f.read()  # until the child exits
    _, status = os.waitpid(pid, 0)
    if text:
        return json.loads(text)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_OVER_LIMIT:
        return {"over_limit": True}
    return {"error": f"measurement process ended with wait status {status}"}


def _run_spawned(spec: Dict) -> Dict:
    """measure(spec) in a fresh interpreter: CUDA cannot be used again in a fork of a process that touched it."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-one", json.dumps(spec)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if lines:
        return json.loads(lines[-1])
    return {"error": f"measurement process ended with status {done.returncode}"}


def measure_one(spec: Dict) -> Dict:
    """measure(spec) in this process, with out-of-memory and other failures reported as results."""
    try:
        return measure(spec)
    except torch.OutOfMemoryError:
        return {"over_limit": True}
    except Exception as e:  # reported to the parent, which records it
        return {"error": f"{type(e).__name__}: {e}"}


def serve() -> None:
    """Read one JSON spec per stdin line, answer one JSON result per stdout line, each measured in a fresh
    process: a fork on the CPU, a new interpreter on CUDA."""
    gc.freeze()  # the imported modules' objects: the children's collections skip them (no copy-on-write of the heap)
    for line in sys.stdin:
        spec = json.loads(line)
        run = _run_spawned if spec["device"].startswith("cuda") else _run_forked
        print(json.dumps(run(spec)), flush=True)
    gc.unfreeze()  # collectable again at exit: frozen, triton's nanobind objects were reported as leaked (~30 lines)


class Server:
    """The parent's handle on the `--serve` process (a context manager)."""

    def __init__(self, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, os.path.abspath(__file__), "--serve"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def run(self, spec: Dict) -> Dict:
        """Measure one spec in a fresh process."""
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the measurement server exited (status {self.proc.wait()})")
        return json.loads(line)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ---------------------------------------------------------------- the benchmark (parent process)


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class Bench:
    """Runs and caches measurements of (N, mode, batch, SDPA kernel), budget checks and the max-batch search."""

    def __init__(self, server: Server, base_spec: Dict, budget_gib: Optional[float]):
        self.server, self.base_spec, self.budget = server, base_spec, budget_gib
        self.cache: Dict[Tuple[int, str, int, str], Dict] = {}
        cpu = base_spec["device"] == "cpu"
        self.safety = int(SAFETY_FRACTION * _mem_available()) if cpu else None

    def record(self, n: int, mode: str, batch: int, sdpa: str, limit_gib: Optional[float] = None) -> Dict:
        """The record of one measurement (run once; a limited probe only when no full one exists)."""
        key = (n, mode, batch, sdpa)
        if key in self.cache:
            return self.cache[key]
        limits = [x for x in (self.safety, limit_gib and int(limit_gib * GIB)) if x]
        limit = min(limits) if limits else None
        out = self.server.run({**self.base_spec, "n": n, "mode": mode, "batch": batch, "sdpa": sdpa, "limit_bytes": limit})
        rec: Dict = {"n": n, "mode": MODES[mode], "batch": batch, "sdpa": sdpa, **out}
        if "peak_bytes" in out:
            rec["peak_gib"] = (out["peak_bytes"] - out["baseline_bytes"]) / GIB
            rec["static_gib"] = out["static_bytes"] / GIB
        if self.budget is not None:
            rec["fits"] = self._fits(rec, limit)
        self.cache[key] = rec
        return rec

    def _fits(self, rec: Dict, limit: Optional[int]) -> Optional[bool]:
        """static + peak <= budget; a step stopped at a limit below the budget is unknown (None)."""
        if "peak_gib" in rec:
            return rec["static_gib"] + rec["peak_gib"] <= self.budget
        if rec.get("over_limit") and limit is not None and limit <= self.budget * GIB:
            return False
        return None

    def max_batch(self, n: int, mode: str, sdpa: str, cap: int) -> Dict:
        """Largest batch <= cap whose step fits the budget: doubling from 1, then bisecting."""
        fits = lambda b: bool(self.record(n, mode, b, sdpa, self.budget).get("fits"))  # noqa: E731
        head = {"n": n, "mode": MODES[mode], "sdpa": sdpa}
        if not fits(1):
            return {**head, "max_batch": 0}
        lo, hi = 1, None
        while hi is None and lo < cap:
            b = min(2 * lo, cap)
            lo, hi = (b, None) if fits(b) else (lo, b)
        while hi is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        best = self.record(n, mode, lo, sdpa)
        return {**head, "max_batch": lo, "capped": hi is None, "peak_gib": best.get("peak_gib"), "static_gib": best.get("static_gib")}


def _add_ratios(records: List[Dict]) -> None:
    """dense peak / MoCA peak on each MoCA record of the same (N, batch, SDPA kernel)."""
    peaks = {(r["n"], r["batch"], r["sdpa"], r["mode"]): r.get("peak_gib") for r in records}
    for r in records:
        dense = peaks.get((r["n"], r["batch"], r["sdpa"], "dense"))
        if r["mode"] == "moca" and r.get("peak_gib") and dense:
            r["dense_over_moca"] = dense / r["peak_gib"]


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=positive_int, nargs="+", default=DEFAULT_N, help="component counts")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1], help="batch sizes, each measured for every N and mode")
    p.add_argument("--config", nargs="+", default=None,
                   help="JSON files of MoCATransformer arguments, later ones overriding earlier (default: benchkit.DEFAULT_CONFIG, as forward.py)")
    p.add_argument("--latents", type=int, default=None, help="latent tokens per component L (overrides the config)")
    p.add_argument("--width", type=int, default=None, help="model width (overrides the config)")
    p.add_argument("--layers", type=int, default=None, help="blocks, global on even indices (overrides the config)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (overrides the config)")
    p.add_argument("--compression", type=int, default=None, help="compression ratio sigma (overrides the config)")
    p.add_argument("--backend", default=None, choices=list(BACKENDS), help="MoC attention backend (default: the config's, auto)")
    p.add_argument("--k-fraction", type=float, default=None, help=f"routed fraction of the components (default {DEFAULT_K_FRACTION})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp32 CPU, bf16 GPU (weights cast too, unless --amp)")
    p.add_argument("--amp", action="store_true", help="fp32 weights and inputs, forward under autocast to --dtype (as the trainer)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the measurements (default: this process's)")
    p.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="training steps before the baseline (small ones on the CPU)")
    p.add_argument("--sdpa", nargs="+", choices=SDPA_CHOICES, default=["auto"],
                   help="attention kernels, each measured: auto (torch's fused kernels) or math (score matrices materialised)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--scene", action="store_true", help="condition tokens per component (B, N, T_c, cond_dim), as a scene training step")
    p.add_argument("--budget-gib", type=float, default=None, help="mark which steps fit in this many GiB (static + peak)")
    p.add_argument("--max-batch", action="store_true", help="also search the largest batch that fits --budget-gib")
    p.add_argument("--max-batch-cap", type=positive_int, default=DEFAULT_MAX_BATCH_CAP, help="largest batch the search tries")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    args = p.parse_args(argv)
    if args.serve:
        serve()
        return {}
    if args.measure_one is not None:
        print(json.dumps(measure_one(json.loads(args.measure_one))), flush=True)
        return {}
    if args.max_batch and args.budget_gib is None:
        p.error("--max-batch needs --budget-gib")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend == "fused" and device.type != "cuda":
        p.error("the fused backend (Triton kernels) needs a CUDA device")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    threads = args.threads or torch.get_num_threads()
    config = load_config(args.config)
    overrides = {"num_latents": args.latents, "width": args.width, "num_layers": args.layers, "num_heads": args.heads,
                 "compression": args.compression, "topk_ratio": args.k_fraction, "attention_backend": args.backend}
    config.update({k: v for k, v in overrides.items() if v is not None})
    config.setdefault("topk_ratio", DEFAULT_K_FRACTION)
    spec = {"config": config, "device": str(device), "dtype": dtype, "threads": threads, "warmup": args.warmup, "amp": args.amp,
            "grad_checkpointing": args.grad_checkpointing, "scene": args.scene}
    env = f"torch {torch.__version__}, {device.type}" + ("" if device.type == "cuda" else f", {threads} threads")  # no CUDA context here
    precision = f"{dtype} autocast, fp32 weights" if args.amp else dtype
    precision += ", per-instance conditions" if args.scene else ""
    precision += ", gradient checkpointing" if args.grad_checkpointing else ""
    print(f"MoCA vs dense transformer, peak memory of one training step — {config} — {precision}, {env}", flush=True)

    records: List[Dict] = []
    searches: List[Dict] = []
    result = {"config": config, "device": device.type, "dtype": dtype, "amp": args.amp, "scene": args.scene, "grad_checkpointing": args.grad_checkpointing,
              "warmup": args.warmup, "threads": threads, "env": env, "budget_gib": args.budget_gib, "max_batch_cap": args.max_batch_cap,
              "records": records, "max_batch": searches}  # the lists fill as measured

    def save() -> None:
        """Rewrite --json with the records so far: a run killed by a timeout keeps what it measured."""
        _add_ratios(records)
        if args.json:
            write_json(args.json, result, quiet=True)

    with Server(threads) as server:
        bench = Bench(server, spec, args.budget_gib)
        for sdpa in args.sdpa:
            for n in args.n:
                for batch in args.batch:
                    for mode in MODES:  # side by side
                        t0 = time.perf_counter()
                        rec = bench.record(n, mode, batch, sdpa)
                        records.append(rec)
                        save()
                        peak = f"{rec['peak_gib']:.3f} GiB" if "peak_gib" in rec else rec.get("error", "over the limit")
                        print(f"  SDPA {sdpa} N={n} B={batch} {MODES[mode]}: {peak} ({time.perf_counter() - t0:.0f} s)", flush=True)
            for n in args.n if args.max_batch else []:
                for mode in MODES:
                    searches.append(bench.max_batch(n, mode, sdpa, args.max_batch_cap))
                    save()
                    print(f"  SDPA {sdpa} N={n} {MODES[mode]}: max batch {searches[-1]['max_batch']} in {args.budget_gib:g} GiB", flush=True)

    cols = [("SDPA", "sdpa", "{:>4}"), ("N", "n", "{:>4}"), ("mode", "mode", "{:>6}"), ("batch", "batch", "{:>5}"), ("peak GiB", "peak_gib", "{:>8.3f}"),
            ("dense/MoCA", "dense_over_moca", "{:>9.2f}x"), ("static GiB", "static_gib", "{:>10.3f}")]
    if args.budget_gib is not None:
        cols.append((f"fits {args.budget_gib:g} GiB", "fits", "{!s}"))
    print_table(records, cols)
    if searches:
        print(f"largest batch within {args.budget_gib:g} GiB (static + peak; search capped at {args.max_batch_cap}):")
        print_table(searches, [("SDPA", "sdpa", "{:>4}"), ("N", "n", "{:>4}"), ("mode", "mode", "{:>6}"), ("max batch", "max_batch", "{:>9}"), ("peak GiB", "peak_gib", "{:>8.3f}")])
    print("method:", ", ".join(sorted({r["method"] for r in records if "method" in r})))
    if args.json:
        write_json(args.json, result)  # what the last save() wrote, now announced
    return result


if __name__ == "__main__":
    run_script(main)
