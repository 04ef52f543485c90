"""Benchmark: one training step of the whole MoCA transformer for each MoC attention backend, side by side.

attention.py times the attention layer alone; what a training run pays is the whole step: forward + flow loss +
backward of the transformer (benchkit.flow_training_step, as memory.py measures its peak), with every other layer
alike. For each N the same model (same weights) takes one step per backend in turn within every repeat (interleaved:
a shared machine's load hits all alike), the median is reported, and the ratio of each to `reference`. `auto`'s
choice on this device (attention.backends.select_backend) is marked, so the table says whether it picks the fastest.
On the CPU the backends with a backward are reference, chunked and matmul (flex_attention has none there).
Prints a table and writes JSON (--json), rewritten (atomically) after each N.

    python benchmarks/train_step.py --n 4 8 16 32 --batch 1 --threads 2 --json benchmarks/results/train_step_cpu.json
"""

from __future__ import annotations

import argparse
import platform
from typing import Dict, List, Optional

import torch

from moca3d.attention.backends import select_backend
from moca3d.defaults import SHIPPED_PREFIX, shipped_path
from moca3d.models.transformer import MoCATransformer

from benchkit import flow_training_step, load_config, positive_int, print_table, run_script, time_interleaved, write_json  # benchmarks/benchkit.py

CPU_BACKENDS = ("reference", "chunked", "matmul")  # differentiable on the CPU
CUDA_BACKENDS = ("reference", "chunked", "matmul", "blocksparse", "fused")
BUILT_IN = f"{SHIPPED_PREFIX}default/transformer/config.json"  # the model a CPU user fine-tunes (recorded so, not by install path)


def bench_n(model: MoCATransformer, n: int, batch: int, backends: List[str], device: torch.device, dtype: torch.dtype,
            repeats: int) -> Dict:
    """Median ms of one training step at N = n per backend, and each one's ratio to reference."""
    step, _ = flow_training_step(model, batch, n, device, dtype)

    def with_backend(name: str):
        def run() -> None:
            model.attention_config.backend = name  # shared by every layer of the model
            step()
            model.zero_grad(set_to_none=True)
        return run

    ms = time_interleaved({name: with_backend(name) for name in backends}, device, repeats, warmup=1)
    auto = select_backend(type(model.attention_config)(**{**model.attention_config.to_dict(), "backend": "auto"}), device)
    fastest = min(ms, key=ms.get)
    return {"n": n, "batch": batch, **{f"{name}_ms": t for name, t in ms.items()}, "fastest": fastest, "auto": auto,
            "auto_over_fastest": ms[auto] / ms[fastest] if auto in ms else None,
            "ratio_to_reference": {name: ms[name] / ms["reference"] for name in ms} if "reference" in ms else {}}


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, nargs="+", default=[4, 8, 16, 32], help="component counts")
    p.add_argument("--batch", type=positive_int, default=1, help="samples per step")
    p.add_argument("--config", nargs="+", default=[BUILT_IN], help="JSON of MoCATransformer arguments (default: the built-in model's)")
    p.add_argument("--backends", nargs="+", default=None, help="backends to time (default: every one with a backward on the device)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: this process's)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats (median reported)")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backends or list(CUDA_BACKENDS if device.type == "cuda" else CPU_BACKENDS)
    if device.type == "cpu" and {"blocksparse", "fused"} & set(backends):
        p.error("blocksparse has no backward on the CPU and fused needs CUDA: time reference, chunked or matmul")
    config = load_config([str(shipped_path(path)) for path in args.config])
    torch.manual_seed(0)
    model = MoCATransformer(**{**config, "attention_mode": "moc"})
    torch.nn.Module.to(model, device, dtype).train()  # plain cast (diffusers warns on .to(dtype)); training: sampled routing
    header = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "config": args.config, "repeats": args.repeats}
    records = []
    for n in args.n:
        records.append({**header, **bench_n(model, n, args.batch, backends, device, dtype, args.repeats)})
        if args.json:
            write_json(args.json, records, quiet=True)
    cols = [("N", "n", "{}")] + [(f"{b} ms", f"{b}_ms", "{:.0f}") for b in backends] + \
        [("fastest", "fastest", "{}"), ("auto", "auto", "{}"), ("auto / fastest", "auto_over_fastest", "{:.2f}")]
    print_table(records, cols)
    if args.json:
        print(f"wrote {args.json}")
    return records


if __name__ == "__main__":
    run_script(main)
