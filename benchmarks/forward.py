"""Benchmark: one forward pass of the whole MoCA transformer vs the dense-global baseline.

For each N it times the full transformer (same size, same weights apart from the router) and
splits the time into local attention, routing, global attention (routing excluded) and total,
with module hooks (CUDA-synchronised on a GPU). The paper's Table 4, side by side in one run. --json is rewritten
(atomically) after each N, so a run stopped by a timeout keeps the Ns it measured.

    python benchmarks/forward.py --n 4 8 16 32 --config benchmarks/forward_l512.json --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from moca3d.attention import LocalAttention, MoCAttention, Router
from moca3d.attention.config import BACKENDS
from moca3d.models.transformer import MoCATransformer

from benchkit import COND_TOKENS, load_config, positive_int, run_script, write_json  # benchmarks/benchkit.py


class SectionTimer:
    """Accumulates wall time spent inside modules of given types (hooks; nested sections allowed)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = device
        self.totals: Dict[str, float] = defaultdict(float)
        self.starts: Dict[int, float] = {}
        self.handles = []
        for module in model.modules():
            name = {Router: "routing", MoCAttention: "global", LocalAttention: "local"}.get(type(module))
            if name is not None:
                self.handles.append(module.register_forward_pre_hook(self._pre))
                self.handles.append(module.register_forward_hook(lambda m, i, o, name=name: self._post(m, name)))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _pre(self, module, inputs) -> None:
        self._sync()
        self.starts[id(module)] = time.perf_counter()

    def _post(self, module, name: str) -> None:
        self._sync()
        self.totals[name] += (time.perf_counter() - self.starts.pop(id(module))) * 1e3

    def reset(self) -> None:
        self.totals.clear()


def build(config: dict, n: int, mode: str, device: torch.device, dtype: torch.dtype):
    """A transformer of `mode` ("moc" or "dense") with its inputs and section timer."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (a CPU init of forward_gpu.json's model: 13 s on 2 cores)
        model = MoCATransformer(**{**config, "attention_mode": mode})
    torch.nn.Module.to(model, device, dtype).eval()  # plain cast (diffusers warns on .to(dtype))
    L, C = config["num_latents"], config["in_channels"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, L, C, generator=g).to(device, dtype)
    t = torch.rand(1, generator=g).to(device)
    cond = torch.randn(1, COND_TOKENS, config["cond_dim"], generator=g).to(device, dtype)
    kwargs = {"ids": model.sample_ids(1, n, torch.Generator().manual_seed(0), device)}
    if config.get("layout_features"):  # a scene model's mask layout (1, N, F) in [-1, 1]
        kwargs["layout"] = (torch.rand(1, n, config["layout_features"], generator=g) * 2 - 1).to(device)
    return model, (x, t, cond), kwargs, SectionTimer(model, device)


def bench_pair(config: dict, n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> List[Dict]:
    """MoCA and dense forwards of the same size, timed in turn within each repeat (side by side)."""
    setups = {mode: build(config, n, mode, device, dtype) for mode in ("moc", "dense")}
    moc, dense = setups["moc"][0], setups["dense"][0]
    dense.load_state_dict({k: v for k, v in moc.state_dict().items() if ".router." not in k})  # the same seed gives the modes different weights
    runs: Dict[str, List[Dict]] = {mode: [] for mode in setups}
    with torch.no_grad():
        for model, args, kwargs, _ in setups.values():
            model(*args, **kwargs)  # warm-up
        for _ in range(repeats):
            for mode, (model, args, kwargs, timer) in setups.items():
                timer.reset()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(*args, **kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                total = (time.perf_counter() - t0) * 1e3
                runs[mode].append({"total_ms": total, "local_ms": timer.totals["local"], "routing_ms": timer.totals["routing"],
                                   "global_ms": timer.totals["global"] - timer.totals["routing"]})
    records = []
    for mode, rs in runs.items():
        rec = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        rec.update(n=n, mode="moca" if mode == "moc" else mode, device=device.type, dtype=str(dtype).replace("torch.", ""))
        rec["other_ms"] = rec["total_ms"] - rec["local_ms"] - rec["routing_ms"] - rec["global_ms"]
        records.append(rec)
    return records


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, nargs="+", default=[4, 8, 16, 32, 64], help="component counts")
    p.add_argument("--config", default=None, help="JSON of MoCATransformer arguments (default: a mid-size CPU config)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats (median reported)")
    p.add_argument("--backend", default=None, choices=list(BACKENDS), help="MoC attention backend of the MoCA model (default: the config's, auto)")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend == "fused" and device.type != "cuda":
        p.error("the fused backend (Triton kernels) needs a CUDA device")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    config = load_config(args.config)
    if args.backend:
        config["attention_backend"] = args.backend
    env = f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads"
    print(f"MoCA transformer forward vs dense global — {config} — {dtype}, {env}")
    records = []
    result = {"config": config, "repeats": args.repeats, "env": env, "records": records}  # records fill as measured
    for n in args.n:
        pair = bench_pair(config, n, device, dtype, args.repeats)
        pair[0]["speedup"] = pair[1]["total_ms"] / pair[0]["total_ms"]
        records += pair
        if args.json:
            write_json(args.json, result, quiet=True)
        print(f"  N={n}: MoCA {pair[0]['total_ms']:.0f} ms, dense {pair[1]['total_ms']:.0f} ms ({pair[0]['speedup']:.2f}x)", flush=True)
    print(f"{'N':>4} | {'mode':>6} | {'local ms':>9} | {'routing ms':>10} | {'global ms':>9} | {'other ms':>9} | {'total ms':>9} | speedup")
    for r in records:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"{r['n']:>4} | {r['mode']:>6} | {r['local_ms']:>9.1f} | {r['routing_ms']:>10.2f} | {r['global_ms']:>9.1f} | {r['other_ms']:>9.1f} | {r['total_ms']:>9.1f} | {sp}")
    if args.json:
        write_json(args.json, result)  # what the last one wrote, now announced
    return records


if __name__ == "__main__":
    run_script(main)
