"""Benchmark: what a fine-tuning step of the MoCA transformer holds beyond its weights, full vs LoRA.

Two parts, side by side for full fine-tuning and LoRA of each --ranks (moca3d.models.lora, the
trainer's `transformer_lora_rank`, with the parts a prior lacks trained in full):

* counted, at a prior's size (--prior triposg: TripoSG's DiT as `moca3d convert triposg` builds it,
  on the meta device, nothing allocated): trainable parameters and the fp32 training state they
  bring — gradient, AdamW's two moments and the EMA copy, 16 bytes each (the trainer's fp32 master
  weights under bf16 autocast);
* measured, at --width / --layers (CPU, fp32): one process per variant builds the transformer and one
  batch (B samples of N components), then the peak memory of two training steps (forward, flow loss,
  backward, clipping, AdamW, EMA update: the optimizer and EMA state are created inside, as the
  trainer's first step does) over the memory once weights and batch exist (benchkit.measure_peak: the
  resident set of the live allocations; without it peft's freed temporaries, three full-size tensors per
  adapted layer, stayed in the heap and read LoRA's peak 0.9 GiB high).

    python benchmarks/finetune_memory.py --ranks 8 32 --json benchmarks/results/finetune_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

from moca3d.flow import flow_loss, interpolate
from moca3d.models.lora import add_lora, save_adapter, trainable_summary
from moca3d.models.transformer import PRIOR_FREE_MODULES, MoCATransformer
from moca3d.training.checkpoints import EMA, frozen_fingerprint, save_checkpoint

from benchkit import COND_TOKENS, GIB, MIB, measure_peak, positive_int, print_table, run_script, write_json  # benchmarks/benchkit.py

STATE_BYTES = 16  # per trainable parameter: fp32 gradient, AdamW exp_avg and exp_avg_sq, EMA copy
FP32_BYTES = 4
CHECKPOINT_STATE_BYTES = 12  # per trainable parameter in a checkpoint beside its weight: EMA, AdamW's two moments
PRIORS = ("triposg",)


def prior_config(name: str, num_latents: int) -> Dict:
    """The MoCATransformer config of a released prior after conversion."""
    from moca3d.convert.triposg import moca_config_from_triposg

    if name != "triposg":
        raise ValueError(name)
    return moca_config_from_triposg({}, num_latents)  # the released DiT's defaults (width 2048, 21 blocks)


def build(config: Dict, rank: int, device: str = "cpu") -> MoCATransformer:
    """The transformer of `config` (on `device`; "meta" allocates nothing), with LoRA of `rank` when > 0."""
    with torch.device(device):
        model = MoCATransformer(**config)
    if rank:
        add_lora(model, rank, train_full=PRIOR_FREE_MODULES)
    return model


def count(config: Dict, rank: int) -> Dict:
    """Trainable and total parameters, the fp32 training state of the trainable ones, and what a checkpoint (weights
    but the frozen ones, EMA, AdamW) and a LoRA adapter folder (the trained tensors) hold."""
    trained, total = trainable_summary(build(config, rank, "meta"))
    stored = trained if rank else total  # checkpoints leave frozen weights out (their fingerprint stands in)
    return {"trainable": trained, "params": total, "state_gib": trained * STATE_BYTES / GIB,
            "checkpoint_gib": (stored * FP32_BYTES + trained * CHECKPOINT_STATE_BYTES) / GIB,
            "adapter_gib": trained * FP32_BYTES / GIB if rank else None}


def measure(spec: Dict) -> Dict:
    """Peak bytes of two full training steps over the bytes of weights and batch (this process)."""
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    config, B, N = spec["config"], spec["batch"], spec["n"]
    model = build(config, spec["rank"]).train()
    L, C = config["num_latents"], config["in_channels"]
    z0, noise = torch.randn(B, N, L, C), torch.randn(B, N, L, C)
    t = torch.rand(B)
    cond = torch.randn(B, COND_TOKENS, config["cond_dim"])
    mask = torch.ones(B, N, dtype=torch.bool)
    ids = torch.arange(N).expand(B, N)

    def steps():
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        ema = EMA(model)
        for _ in range(2):
            pred = model(interpolate(z0, noise, t), t, cond, component_mask=mask, ids=ids)
            loss = flow_loss(pred, z0, noise, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            ema.update(model)
        return optimizer, ema

    base, peak = measure_peak(steps, torch.device("cpu"))
    trained, total = trainable_summary(model)
    optimizer, ema = steps()
    with tempfile.TemporaryDirectory() as tmp:  # what the trainer writes: a checkpoint, and a LoRA run's adapter
        saved = save_checkpoint(tmp, 1, model, optimizer, ema, frozen=frozen_fingerprint(model))
        adapter = save_adapter(Path(tmp) / "lora", model, {}) if spec["rank"] else None
        sizes = {"checkpoint_mib": folder_bytes(saved) / MIB, "adapter_mib": folder_bytes(adapter) / MIB if adapter else None}
    return {"peak_mib": (peak - base) / MIB, "trainable": trained, "params": total, **sizes}


def folder_bytes(folder: Path) -> int:
    """Total size of the files in `folder`."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def measure_in_child(spec: Dict) -> Dict:
    """`measure(spec)` in a fresh interpreter (no allocator state shared between variants)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-one", json.dumps(spec)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"error": f"measurement process ended with status {done.returncode}"}
    return json.loads(lines[-1])


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=positive_int, nargs="+", default=[8, 32], help="LoRA ranks, each beside full fine-tuning")
    p.add_argument("--prior", choices=PRIORS, default="triposg", help="the released prior whose size is counted")
    p.add_argument("--prior-latents", type=positive_int, default=512, help="latent tokens per part of the counted prior")
    p.add_argument("--width", type=positive_int, default=1024, help="width of the measured transformer")
    p.add_argument("--layers", type=positive_int, default=8, help="blocks of the measured transformer")
    p.add_argument("--heads", type=positive_int, default=16, help="attention heads of the measured transformer")
    p.add_argument("--latents", type=positive_int, default=256, help="latent tokens per part L (measured)")
    p.add_argument("--n", type=positive_int, default=4, help="components per sample (measured)")
    p.add_argument("--batch", type=positive_int, default=1, help="samples per step (measured)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads of the measurements")
    p.add_argument("--no-measure", action="store_true", help="only count (the prior's size); no training steps")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    args = p.parse_args(argv)
    if args.measure_one:
        print(json.dumps(measure(json.loads(args.measure_one))))
        return {}
    prior = prior_config(args.prior, args.prior_latents)
    measured = {"num_latents": args.latents, "in_channels": 64, "width": args.width, "num_layers": args.layers,
                "num_heads": args.heads, "cond_dim": 1024, "compression": 8}
    records = []
    for rank in [0] + args.ranks:
        name = f"LoRA r={rank}" if rank else "full"
        rec = {"variant": name, "rank": rank, **{f"prior_{k}": v for k, v in count(prior, rank).items()}}
        if not args.no_measure:
            spec = {"config": measured, "rank": rank, "batch": args.batch, "n": args.n, "threads": args.threads}
            rec.update({f"measured_{k}": v for k, v in measure_in_child(spec).items()})
        records.append(rec)
        print(f"{name} done", file=sys.stderr)
    cols = [("variant", "variant", "{}"), (f"{args.prior} trainable", "prior_trainable", "{:,}"),
            ("of", "prior_params", "{:,}"), ("state GiB (16 B each)", "prior_state_gib", "{:.2f}"),
            ("checkpoint GiB", "prior_checkpoint_gib", "{:.2f}"), ("adapter GiB", "prior_adapter_gib", "{:.2f}")]
    if not args.no_measure:
        cols += [("measured trainable", "measured_trainable", "{:,}"), ("step peak MiB", "measured_peak_mib", "{:.0f}"),
                 ("checkpoint MiB", "measured_checkpoint_mib", "{:.0f}"), ("adapter MiB", "measured_adapter_mib", "{:.1f}")]
    print_table(records, cols)
    report = {"settings": {**vars(args), "prior_config": prior, "measured_config": measured,
                           "torch": torch.__version__}, "records": records}
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    run_script(main)
