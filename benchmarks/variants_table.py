"""Table: the same recipe trained with MoCA, dense-global and local-only attention (the paper's Table 1
analogue on the procedural domain), from `moca3d evaluate-model --json` reports and the training runs.

    python benchmarks/variants_table.py --run moca=runs/cpu/moc --eval moca=runs/cpu/eval_moc.json \\
        --run dense=runs/cpu/dense --eval dense=runs/cpu/eval_dense.json \\
        --run none=runs/cpu/none --eval none=runs/cpu/eval_none_2-9.json --eval none=runs/cpu/eval_none_10-16.json \\
        --json benchmarks/results/variants_cpu.json

Several --eval files of one variant (e.g. part-count ranges run in parallel) are merged asset by asset.
An object whose every generated part came out empty scores F = 0 and is counted under "empty"; its
(infinite) Chamfer distance is left out of the mean CD. Self-IoU is averaged over the objects that have one (two
non-empty parts or more; reports from 2026-12-03 on say null for the others, earlier ones 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from moca3d.errors import InputError
from moca3d.evaluation import finite_mean

from benchkit import named_paths, print_table, run_script, write_json  # benchmarks/benchkit.py

METRICS = ["fscore@0.1", "fscore@0.05", "self_iou", "seconds"]  # means over the objects that have each (`finite_mean`)


def training_summary(run: Path) -> Dict:
    """Steps, seconds and the last logged loss of a run folder (train_log.jsonl, train_config.json)."""
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r for r in records if "loss" in r]
    config = json.loads((run / "train_config.json").read_text())
    steps = max(int(d.name.split("_")[1]) for d in (run / "checkpoints").glob("step_*"))  # the last step run
    return {"steps": steps, "train_seconds": max(losses[-1]["time"], config.get("time_limit_s") or 0.0), "last_logged_loss": losses[-1]["loss"],
            "batch_size": config["batch_size"], "attention_mode": config["transformer"].get("attention_mode", "moc")}


def read_assets(path: str) -> List[Dict]:
    """The per-asset rows of an `evaluate-model --json` report."""
    report = json.loads(Path(path).read_text())
    if not isinstance(report, dict) or "assets" not in report:
        raise InputError(f"{path}: not a `moca3d evaluate-model --json` report (no per-asset rows)")
    return report["assets"]


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_FOLDER")
    p.add_argument("--eval", action="append", default=[], help="NAME=EVAL_JSON (repeatable per name)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runs, evals = named_paths(args.run), named_paths(args.eval)
    records = []
    for name, files in evals.items():
        assets = [a for f in files for a in read_assets(f)]
        # an all-empty prediction has no surface: F = 0 in the means, its infinite CD (null in evaluate-model's strict JSON)
        # left out and counted
        finite = [a["chamfer"] for a in assets if a["chamfer"] is not None and np.isfinite(a["chamfer"])]
        rec = {"variant": name, "count": len(assets), "chamfer": float(np.mean(finite)) if finite else None,
               **{k: finite_mean(assets, k) for k in METRICS}}
        rec["empty"] = len(assets) - len(finite)
        rec["min_parts"], rec["max_parts"] = min(a["num_parts"] for a in assets), max(a["num_parts"] for a in assets)
        if name in runs:
            rec.update(training_summary(Path(runs[name][0])))
        rec["assets"] = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in a.items()} for a in assets]  # strict JSON
        records.append(rec)
    cols = [("variant", "variant", "{:>8}"), ("objects", "count", "{:>7}"), ("steps", "steps", "{:>6}"), ("train s", "train_seconds", "{:>7.0f}"),
            ("empty", "empty", "{:>5}"), ("CD", "chamfer", "{:>6.3f}"), ("F@0.1", "fscore@0.1", "{:>6.3f}"), ("F@0.05", "fscore@0.05", "{:>6.3f}"),
            ("self-IoU", "self_iou", "{:>8.3f}"), ("s/object", "seconds", "{:>8.1f}")]
    print_table(records, cols)
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    run_script(main)
