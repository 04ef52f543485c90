"""Benchmark: MoC global attention vs dense global attention, side by side in one run.

For each N it times, from the same projected q/k/v (the shared Q/K/V/output projections are
timed separately as whole layers):
  dense_ms   one SDPA over all z tokens of all components (the PartCrafter-style baseline)
  moc_ms     routing + routed attention, for each backend; the fastest is reported
  routing_ms the router alone (anchor projections, importance, ranking)
and forward+backward for both, the context length measured vs L + kL + (N-k-1)L/sigma, the
attention-FLOP ratio, and peak memory (CUDA allocator peak; on the CPU the rise of the kernel's
peak RSS, reset before each call: benchkit.measure_peak). Prints a table and writes JSON (--json), rewritten
(atomically) after each N, so a run stopped by a timeout keeps the Ns it measured.

    python benchmarks/attention.py --n 4 8 16 32 64 --L 256 --dim 512 --heads 8 --json out.json
"""

from __future__ import annotations

import argparse
import platform
import warnings
from typing import Callable, Dict, List, Optional

import torch

from moca3d.attention import BACKENDS, MoCAttention, MoCAttentionConfig
from moca3d.attention.backends.fused import interpreted
from moca3d.attention.backends import dense_global_attention
from moca3d.attention.backends.context import build_context

from benchkit import peak_memory_mb, positive_int, print_table, run_script, time_interleaved, write_json  # benchmarks/benchkit.py

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def attention_flops(queries: int, keys: int, dim: int) -> float:
    """Multiply-adds x2 of QK^T and AV: 4 * queries * keys * dim."""
    return 4.0 * queries * keys * dim


def bench_n(args, n: int, device: torch.device, dtype: torch.dtype) -> Dict:
    torch.manual_seed(0)
    L, D, H = args.L, args.dim, args.heads
    Np = L // args.sigma
    T = L + Np + 1
    kw = dict(dim=D, num_heads=H, topk_ratio=args.k_fraction)
    moc = MoCAttention(MoCAttentionConfig(**kw)).to(device, dtype).eval()
    dense = MoCAttention(MoCAttentionConfig(mode="dense", **kw)).to(device, dtype).eval()
    dense.load_state_dict({k: v for k, v in moc.state_dict().items() if not k.startswith("router.")})
    cfg = moc.config
    x = torch.randn(1, n, T, D, device=device, dtype=dtype)
    with torch.no_grad():
        q, k, v = moc.project(x, num_keys=L + Np)  # q: (1, N, H, T, d); k, v: (1, N, H, L+Np, d)
        routing = moc.route(x)
        K, _, _ = build_context(k, v, L, routing, cfg, torch.arange(n, device=device)[:1])
    k_routed = cfg.num_routed(n)
    ctx_measured, ctx_formula = K.shape[2], L + k_routed * L + (n - k_routed - 1) * Np
    del K

    rec: Dict = dict(
        n=n, L=L, dim=D, heads=H, sigma=args.sigma, k=k_routed, dtype=str(dtype).replace("torch.", ""),
        device=device.type, context_len=ctx_measured, context_len_formula=ctx_formula, dense_context_len=n * L,
    )
    rec["flop_ratio"] = attention_flops(n * T, n * L, D) / attention_flops(n * T, ctx_measured, D)

    # Forward (inference): dense, routing and every backend timed in turn within each repeat.
    with torch.no_grad():
        fns: Dict[str, Callable[[], object]] = {"dense": lambda: dense_global_attention(q, k, v, L), "routing": lambda: moc.route(x)}
        for name in args.backends:
            if name == "blocksparse" and device.type == "cpu" and not args.cpu_flex:
                continue
            fns[name] = lambda fn=BACKENDS[name]: fn(q, k, v, L, moc.route(x), cfg)
        ms = time_interleaved(fns, device, args.repeats, warmup=2)
        rec["dense_ms"], rec["routing_ms"] = ms.pop("dense"), ms.pop("routing")
        by_backend = ms
        best = min(by_backend, key=by_backend.get)
        rec["moc_ms_by_backend"] = by_backend
        rec["backend"], rec["moc_ms"] = best, by_backend[best]
        rec["speedup"] = rec["dense_ms"] / rec["moc_ms"]
        rec["routing_frac"] = rec["routing_ms"] / rec["moc_ms"]
        layer = time_interleaved({"dense": lambda: dense(x, Np), "moc": lambda: moc(x, Np)}, device, args.repeats)
        rec["layer_dense_ms"], rec["layer_moc_ms"] = layer["dense"], layer["moc"]
        rec["peak_mem_dense_mb"] = peak_memory_mb(lambda: dense_global_attention(q, k, v, L), device)
        rec["peak_mem_moc_mb"] = peak_memory_mb(lambda: BACKENDS[best](q, k, v, L, moc.route(x), cfg), device)

    # Forward + backward (training): gradients w.r.t. q, k, v and the router.
    if not args.no_backward:
        moc.train()
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        grad_out = torch.randn_like(q)
        # every backend with a backward on this device (flex_attention has none on the CPU)
        train_backends = [b for b in args.backends if not (b == "blocksparse" and device.type == "cpu")] or ["chunked"]

        def fwd_bwd_dense() -> None:
            dense_global_attention(*leaves, L).backward(grad_out)

        def fwd_bwd(name: str) -> Callable[[], None]:
            def run() -> None:
                BACKENDS[name](*leaves, L, moc.route(x), cfg).backward(grad_out)
            return run

        fb = time_interleaved({"dense": fwd_bwd_dense} | {b: fwd_bwd(b) for b in train_backends}, device, args.repeats)
        rec["fwd_bwd_dense_ms"] = fb.pop("dense")
        rec["fwd_bwd_ms_by_backend"] = fb
        rec["fwd_bwd_backend"] = min(fb, key=fb.get)
        rec["fwd_bwd_moc_ms"] = fb[rec["fwd_bwd_backend"]]
        rec["fwd_bwd_speedup"] = rec["fwd_bwd_dense_ms"] / rec["fwd_bwd_moc_ms"]
        moc.eval()
    return rec


def print_records(records: List[Dict]) -> None:
    cols = [
        ("N", "n", "{:>4}"), ("k", "k", "{:>3}"), ("ctx", "context_len", "{:>6}"), ("ctx(formula)", "context_len_formula", "{:>12}"),
        ("FLOPx", "flop_ratio", "{:>6.2f}"), ("dense ms", "dense_ms", "{:>9.1f}"), ("MoC ms", "moc_ms", "{:>8.1f}"),
        ("backend", "backend", "{:>11}"), ("speedup", "speedup", "{:>7.2f}x"), ("route ms", "routing_ms", "{:>8.2f}"),
        ("route %", "routing_frac", "{:>7.1%}"), ("fb dense", "fwd_bwd_dense_ms", "{:>9.1f}"), ("fb MoC", "fwd_bwd_moc_ms", "{:>8.1f}"),
        ("fb x", "fwd_bwd_speedup", "{:>5.2f}x"), ("mem dense MiB", "peak_mem_dense_mb", "{:>13.0f}"), ("mem MoC MiB", "peak_mem_moc_mb", "{:>11.0f}"),
    ]
    print_table(records, cols)
    for r in records:
        per = ", ".join(f"{b} {ms:.1f}" for b, ms in r["moc_ms_by_backend"].items())
        print(f"N={r['n']}: MoC ms by backend: {per}; whole layer dense {r['layer_dense_ms']:.1f} ms vs MoC {r['layer_moc_ms']:.1f} ms")
        if "fwd_bwd_ms_by_backend" in r:
            per = ", ".join(f"{b} {ms:.1f}" for b, ms in r["fwd_bwd_ms_by_backend"].items())
            print(f"N={r['n']}: forward+backward ms by backend: {per}; dense {r['fwd_bwd_dense_ms']:.1f}")


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, nargs="+", default=[4, 8, 16, 32, 64], help="component counts")
    p.add_argument("--L", type=int, default=None, help="latent tokens per component (default 256 CPU, 1024 GPU)")
    p.add_argument("--dim", type=int, default=None, help="model width (default 512 CPU, 2048 GPU)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 8 CPU, 16 GPU)")
    p.add_argument("--sigma", type=int, default=8, help="compression ratio: N_p = L / sigma")
    p.add_argument("--k-fraction", type=float, default=0.25, help="routed fraction of the components")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default fp32 CPU, bf16 GPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--backends", nargs="+", default=["reference", "chunked", "blocksparse"], choices=list(BACKENDS))
    p.add_argument("--cpu-flex", action="store_true", help="also time compiled flex_attention on the CPU (slow to compile)")
    p.add_argument("--no-backward", action="store_true", help="skip forward+backward timings")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if "fused" in args.backends and not (gpu or interpreted()):
        p.error("the fused backend (Triton kernels) needs a CUDA device")
    if not gpu and not args.cpu_flex and set(args.backends) == {"blocksparse"}:
        p.error("the blocksparse backend is timed on the CPU only with --cpu-flex")
    args.L = args.L or (1024 if gpu else 256)
    args.dim = args.dim or (2048 if gpu else 512)
    args.heads = args.heads or (16 if gpu else 8)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    env = f"torch {torch.__version__}, {device.type}" + (f" ({torch.cuda.get_device_name()})" if gpu else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"MoC vs dense global attention — L={args.L} D={args.dim} heads={args.heads} sigma={args.sigma} k={args.k_fraction:.0%} {dtype} — {env}")
    records = []
    for n in args.n:
        rec = bench_n(args, n, device, dtype)
        rec.update(env=env, k_fraction=args.k_fraction, repeats=args.repeats)
        records.append(rec)
        if args.json:
            write_json(args.json, records, quiet=True)
        print(f"  N={n}: dense {rec['dense_ms']:.1f} ms, MoC {rec['moc_ms']:.1f} ms ({rec['backend']}), routing {rec['routing_ms']:.2f} ms", flush=True)
    print_records(records)
    if args.json:
        write_json(args.json, records)  # what the last one wrote, now announced
    return records


if __name__ == "__main__":
    run_script(main)
